"""Tests for ddpm_jax.cpu.conv: the convolution with batch-chunked weight gradients.

References are plain numpy in float64 (the convolution and its weight gradient
written out as sums over taps), not the code under test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.cpu import conv


def np_pad(x, strides, padding, k=3):
  """x padded like lax's 'SAME' / 'VALID' / explicit pairs, float64; returns (xp, out_h, out_w)."""
  _, H, W, _ = x.shape
  if padding == "VALID":
    pads = ((0, 0), (0, 0))
  elif padding == "SAME":
    pads = []
    for size, s in zip((H, W), strides):
      out = -(-size // s)
      total = max((out - 1) * s + k - size, 0)
      pads.append((total // 2, total - total // 2))
  else:
    pads = padding
  xp = np.pad(x.astype(np.float64), ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  oh = (xp.shape[1] - k) // strides[0] + 1
  ow = (xp.shape[2] - k) // strides[1] + 1
  return xp, oh, ow


def np_conv(x, kernel, strides, padding):
  xp, oh, ow = np_pad(x, strides, padding, kernel.shape[0])
  sh, sw = strides
  out = 0.0
  for i in range(kernel.shape[0]):
    for j in range(kernel.shape[1]):
      patch = xp[:, i : i + sh * oh : sh, j : j + sw * ow : sw, :]
      out = out + patch @ kernel[i, j].astype(np.float64)
  return out


def np_weight_grad(x, dy, ksize, strides, padding):
  """dW[i, j] = sum_{b, h, w} x_pad[b, s*h + i, s*w + j, :]^T dy[b, h, w, :]."""
  xp, oh, ow = np_pad(x, strides, padding, ksize)
  sh, sw = strides
  dw = np.zeros((ksize, ksize, x.shape[-1], dy.shape[-1]))
  dy = dy.astype(np.float64)
  for i in range(ksize):
    for j in range(ksize):
      patch = xp[:, i : i + sh * oh : sh, j : j + sw * ow : sw, :]
      dw[i, j] = np.einsum("bhwc,bhwd->cd", patch, dy)
  return dw


def assert_conv_matches_numpy(fn, x, kernel, strides, padding, rng):
  """``fn(x, kernel, strides, padding)``, its weight and its input gradient, and its forward-mode
  derivative against float64 numpy.

  Returns the jitted gradient function (of x and kernel) it checked.
  """
  y = np.asarray(fn(jnp.asarray(x), jnp.asarray(kernel), strides, padding))
  ref = np_conv(x, kernel, strides, padding)
  assert y.shape == ref.shape
  np.testing.assert_allclose(y, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)

  dy = rng.randn(*ref.shape).astype(np.float32)
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(fn(x, k, strides, padding) * dy), argnums=(0, 1)))
  dx, dk = grad(jnp.asarray(x), jnp.asarray(kernel))
  ref_dk = np_weight_grad(x, dy, 3, strides, padding)
  np.testing.assert_allclose(np.asarray(dk), ref_dk, atol=1e-5 * np.abs(ref_dk).max(), rtol=0)
  # The input gradient is the transpose of the forward map: <conv(x), dy> = <x, dx> for all x.
  probe = rng.randn(*x.shape)
  np.testing.assert_allclose(
      np.sum(np_conv(probe, kernel, strides, padding) * dy),
      np.sum(probe * np.asarray(dx, np.float64)),
      rtol=1e-4,
  )
  # Forward mode: the convolution is bilinear, so its tangent is conv(dx, k) + conv(x, dk).
  dx, dk = rng.randn(*x.shape).astype(np.float32), rng.randn(*kernel.shape).astype(np.float32)
  jvp = jax.jit(lambda *a: jax.jvp(lambda x, k: fn(x, k, strides, padding), a[:2], a[2:]))
  y, tangent = jvp(*map(jnp.asarray, (x, kernel, dx, dk)))
  ref_t = np_conv(dx, kernel, strides, padding) + np_conv(x, dk, strides, padding)
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
  np.testing.assert_allclose(np.asarray(tangent), ref_t, atol=1e-5 * np.abs(ref_t).max(), rtol=0)
  return grad


@pytest.mark.parametrize(
    "x_shape,out,itemsize,budget,expected",
    [
        ((4, 32, 32, 128), 128, 4, 1 << 19, 1),  # 512 KiB per example: one at a time
        ((16, 32, 32, 32), 32, 4, 1 << 19, 4),  # 128 KiB per example
        ((16, 8, 8, 256), 256, 4, 1 << 19, 8),  # 64 KiB per example
        ((16, 32, 32, 128), 256, 4, 1 << 19, 1),  # the larger of Cin and Cout counts
        ((16, 32, 32, 32), 32, 2, 1 << 19, 8),  # bfloat16 halves the bytes
        ((6, 16, 16, 32), 32, 4, 1 << 17, 3),  # 4 would fit, but must divide 6
        ((4, 32, 32, 128), 3, 4, 1 << 19, 4),  # few output channels: not chunked
        ((4, 32, 32, 128), 128, 4, 0, 4),  # budget 0: not chunked
        ((4, 64, 64, 512), 512, 4, 1 << 19, 1),  # larger than the budget: one per chunk
    ],
)
def test_weight_grad_chunk(x_shape, out, itemsize, budget, expected):
  assert conv.weight_grad_chunk(x_shape, out, itemsize, budget) == expected


@pytest.mark.parametrize(
    "strides,padding",
    [
        ((1, 1), "SAME"),
        ((2, 2), "SAME"),  # the Downsample conv: TF pads 0 before, 1 after
        ((1, 1), ((1, 0), (0, 1))),  # an Upsample phase
        ((1, 1), "VALID"),
    ],
)
def test_conv2d_values_and_gradients_match_numpy(monkeypatch, strides, padding):
  """Forward, input gradient and chunked weight gradient against float64 sums over taps."""
  monkeypatch.setattr(conv, "WEIGHT_GRAD_CHUNK_BYTES", 1)  # one example per chunk
  rng = np.random.RandomState(0)
  x = rng.randn(3, 6, 5, 16).astype(np.float32)  # odd, non-square
  kernel = (0.2 * rng.randn(3, 3, 16, 16)).astype(np.float32)
  grad = assert_conv_matches_numpy(conv.conv2d, x, kernel, strides, padding, rng)
  # The program really was chunked: 1 input-gradient + 3 weight-gradient convs (the loss is
  # linear in the output, so XLA drops the forward conv).
  hlo = grad.lower(jnp.asarray(x), jnp.asarray(kernel)).compile().as_text()
  assert hlo.count(" convolution(") == 4


def test_chunked_weight_grad_bfloat16():
  """bfloat16 chunks: within bfloat16 rounding of the float64 sum, and the partials added in float32."""
  rng = np.random.RandomState(1)
  x = rng.randn(8, 8, 8, 32).astype(np.float32)
  dy = rng.randn(8, 8, 8, 32).astype(np.float32)
  kernel = jnp.zeros((3, 3, 32, 32), jnp.bfloat16)
  got = conv.chunked_weight_grad(
      jnp.asarray(x, jnp.bfloat16), jnp.asarray(dy, jnp.bfloat16), kernel, (1, 1), "SAME", chunk=1
  )
  assert got.dtype == jnp.bfloat16
  ref = np_weight_grad(
      np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64),
      np.asarray(jnp.asarray(dy, jnp.bfloat16), np.float64),
      3,
      (1, 1),
      "SAME",
  )
  # bfloat16 keeps 8 bits: each chunk's and the final rounding, about 2^-8 relative.
  np.testing.assert_allclose(
      np.asarray(got, np.float64), ref, atol=0.02 * np.abs(ref).max(), rtol=0
  )

  # 1000 + 7 * 1 is 1007, which rounds to 1008 in bfloat16 (spacing 4 above 512). Adding
  # the chunks in bfloat16 would round every 1000 + 1 back to 1000.
  ones = jnp.ones((8, 1, 1, 1), jnp.bfloat16)
  dy = jnp.asarray([1000.0] + [1.0] * 7, jnp.bfloat16).reshape(8, 1, 1, 1)
  got = conv.chunked_weight_grad(
      ones, dy, jnp.zeros((1, 1, 1, 1), jnp.bfloat16), (1, 1), "VALID", chunk=1
  )
  assert float(got.reshape(())) == 1008.0


@pytest.mark.parametrize(
    "x_shape,strides,padding",
    [
        ((3, 2, 2, 16), (1, 1), "SAME"),  # the digits U-Net's lowest level
        ((3, 4, 4, 16), (2, 2), "SAME"),  # its Downsample to 2x2: TF pads 0 before, 1 after
        ((3, 5, 6, 16), (1, 1), "SAME"),  # odd, non-square (the rule is not consulted here)
        ((3, 5, 6, 16), (2, 2), "SAME"),
        ((3, 4, 4, 16), (1, 1), ((1, 0), (0, 1))),
        ((3, 4, 4, 16), (1, 1), "VALID"),
    ],
)
def test_conv_as_matmul_values_and_gradients_match_numpy(x_shape, strides, padding):
  """The matrix-product convolution and both its gradients against float64 sums over taps."""
  rng = np.random.RandomState(2)
  x = rng.randn(*x_shape).astype(np.float32)
  kernel = (0.2 * rng.randn(3, 3, 16, 8)).astype(np.float32)
  assert_conv_matches_numpy(conv.conv_as_matmul, x, kernel, strides, padding, rng)


@pytest.mark.parametrize(
    "x_shape,strides,padding,expected",
    [
        ((64, 2, 2, 64), (1, 1), "SAME", True),  # 2x2 output
        ((64, 4, 4, 64), (2, 2), "SAME", True),  # Downsample to 2x2
        ((64, 1, 3, 64), (1, 1), "SAME", True),  # 3 pixels
        ((64, 4, 4, 64), (1, 1), "SAME", False),  # 4x4: XLA's convolution is as fast
        ((64, 8, 8, 64), (2, 2), "SAME", False),  # Downsample to 4x4
        ((64, 2, 3, 64), (1, 1), "SAME", False),  # 6 pixels
    ],
)
def test_matmul_applies(x_shape, strides, padding, expected):
  assert conv.matmul_applies(x_shape, (3, 3, 64, 64), strides, padding) == expected


def test_conv3x3_on_a_2x2_image_is_one_matrix_product():
  """At 2x2 the compiled forward and backward contain no convolution op."""
  x, k = jnp.ones((4, 2, 2, 32)), jnp.ones((3, 3, 32, 32))
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(conv.conv3x3(x, k) ** 2), argnums=(0, 1)))
  assert " convolution(" not in grad.lower(x, k).compile().as_text()
  grad4 = jax.jit(jax.grad(lambda x, k: jnp.sum(conv.conv3x3(x, k) ** 2), argnums=(0, 1)))
  assert " convolution(" in grad4.lower(jnp.ones((4, 4, 4, 32)), k).compile().as_text()
