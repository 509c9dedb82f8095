"""Tests for ddpm_jax.cpu.winograd: F(4x4, 3x3) convolution.

References are plain numpy in float64 (the convolution and its gradients
written out as sums over taps, from tests/test_conv.py) and the defining
identity of the transforms, not the code under test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.cpu import conv, winograd
from tests.test_cpu_conv import np_conv, np_weight_grad


def test_transforms_compute_a_1d_correlation_exactly():
  """A^T [(G g) * (B^T d)] is the 4 outputs of the 3-tap correlation of a 6-tap d (float64)."""
  rng = np.random.RandomState(0)
  for _ in range(5):
    d, g = rng.randn(6), rng.randn(3)
    direct = np.array([d[i : i + 3] @ g for i in range(4)])
    np.testing.assert_allclose(
        winograd.AT @ ((winograd.G @ g) * (winograd.BT @ d)), direct, rtol=0, atol=1e-12
    )


def test_kernel_transform_is_g_g_gt_per_component():
  """Component (j, i) of the transformed kernel is (G g G^T)[i, j] per channel pair (float64 ref)."""
  rng = np.random.RandomState(1)
  k = rng.randn(3, 3, 5, 7)
  want = np.einsum("ir,rsco,js->jico", winograd.G, k, winograd.G).reshape(36, 5, 7)
  got = np.asarray(winograd.kernel_transform(jnp.asarray(k, jnp.float32)), np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  du = rng.randn(36, 5, 7)
  want_t = np.einsum("ir,jico,js->rsco", winograd.G, du.reshape(6, 6, 5, 7), winograd.G)
  got_t = np.asarray(winograd.kernel_transform_transpose(jnp.asarray(du, jnp.float32)), np.float64)
  np.testing.assert_allclose(got_t, want_t, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "shape",
    [
        (2, 8, 8, 16, 24),  # two tiles per side
        (1, 4, 12, 8, 5),  # one tile high, non-square, odd channel counts
        (3, 16, 8, 32, 32),
    ],
)
def test_values_and_gradients_match_numpy(shape):
  """Forward, input gradient, kernel gradient and forward-mode tangent against float64 sums over
  taps."""
  b, h, w, c_in, c_out = shape
  rng = np.random.RandomState(1)
  x = rng.randn(b, h, w, c_in).astype(np.float32)
  kernel = (rng.randn(3, 3, c_in, c_out) / np.sqrt(9 * c_in)).astype(np.float32)
  dy = rng.randn(b, h, w, c_out).astype(np.float32)

  y = np.asarray(jax.jit(winograd.conv3x3)(x, kernel))
  ref = np_conv(x, kernel, (1, 1), "SAME")
  # Winograd's rounding: the transforms scale by up to 8 and sum up to 36 terms (the
  # direct float32 sum is about 1e-6 here).
  np.testing.assert_allclose(y, ref, atol=5e-5 * np.abs(ref).max(), rtol=0)

  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(winograd.conv3x3(x, k) * dy), argnums=(0, 1)))
  dx, dk = (np.asarray(a, np.float64) for a in grad(x, kernel))
  ref_dk = np_weight_grad(x, dy, 3, (1, 1), "SAME")
  np.testing.assert_allclose(dk, ref_dk, atol=5e-5 * np.abs(ref_dk).max(), rtol=0)
  # dx[b, p, q, c] = sum_{i, j, o} dy[b, p - i + 1, q - j + 1, o] kernel[i, j, c, o]: the
  # convolution of dy with the kernel flipped and transposed.
  flipped = kernel[::-1, ::-1].transpose(0, 1, 3, 2)
  ref_dx = np_conv(dy, flipped, (1, 1), "SAME")
  np.testing.assert_allclose(dx, ref_dx, atol=5e-5 * np.abs(ref_dx).max(), rtol=0)

  # Forward mode (jax.jvp, jax.linearize): the tangent of the bilinear map is
  # conv(dx, k) + conv(x, dk).
  tx, tk = rng.randn(*x.shape).astype(np.float32), rng.randn(*kernel.shape).astype(np.float32)
  ref_t = np_conv(tx, kernel, (1, 1), "SAME") + np_conv(x, tk, (1, 1), "SAME")
  _, tangent = jax.jit(lambda *a: jax.jvp(winograd.conv3x3, a[:2], a[2:]))(x, kernel, tx, tk)
  np.testing.assert_allclose(tangent, ref_t, atol=5e-5 * np.abs(ref_t).max(), rtol=0)
  lin = jax.jit(lambda *a: jax.linearize(winograd.conv3x3, *a[:2])[1](*a[2:]))(x, kernel, tx, tk)
  np.testing.assert_allclose(lin, ref_t, atol=5e-5 * np.abs(ref_t).max(), rtol=0)


def test_transposes_are_adjoints():
  """<T a, b> = <a, T^T b> for the input, kernel and output transforms (dot-product test)."""
  rng = np.random.RandomState(2)
  x = rng.randn(2, 8, 12, 3)
  v = rng.randn(36, 2 * 2 * 3, 3)
  k = rng.randn(3, 3, 4, 5)
  u = rng.randn(36, 4, 5)
  m = rng.randn(36, 2 * 2 * 3, 5)
  y = rng.randn(2, 8, 12, 5)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  dot = lambda a, b: float(np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64)))
  pairs = [
      (
          dot(winograd.input_transform(f32(x)), v),
          dot(x, winograd.input_transform_transpose(f32(v), x.shape)),
      ),
      (
          dot(winograd.kernel_transform(f32(k)), u),
          dot(k, winograd.kernel_transform_transpose(f32(u))),
      ),
      (
          dot(winograd.output_transform(f32(m), y.shape), y),
          dot(m, winograd.output_transform_transpose(f32(y))),
      ),
  ]
  for left, right in pairs:
    assert abs(left - right) <= 1e-4 * max(abs(left), 1.0), pairs


@pytest.mark.parametrize(
    "x_shape,k_shape,strides,padding,dtype,expected",
    [
        ((4, 32, 32, 128), (3, 3, 128, 128), (1, 1), "SAME", jnp.float32, True),
        ((4, 16, 16, 64), (3, 3, 64, 256), (1, 1), ((1, 1), (1, 1)), jnp.float32, True),
        ((4, 16, 16, 64), (3, 3, 64, 64), (2, 2), "SAME", jnp.float32, False),  # Downsample
        ((4, 16, 16, 64), (3, 3, 64, 64), (1, 1), "SAME", jnp.bfloat16, False),  # float32 only
        ((4, 8, 8, 256), (3, 3, 256, 256), (1, 1), "SAME", jnp.float32, False),  # too few tiles
        ((4, 18, 18, 64), (3, 3, 64, 64), (1, 1), "SAME", jnp.float32, False),  # not 4 | side
        ((4, 32, 32, 32), (3, 3, 32, 32), (1, 1), "SAME", jnp.float32, False),  # few channels
        ((4, 32, 32, 64), (3, 3, 64, 32), (1, 1), "SAME", jnp.float32, True),  # 96 together
        ((4, 16, 16, 32), (3, 3, 32, 64), (1, 1), "SAME", jnp.float32, True),
        ((4, 16, 16, 16), (3, 3, 16, 128), (1, 1), "SAME", jnp.float32, False),  # 16 in
        ((4, 32, 32, 128), (3, 3, 128, 3), (1, 1), "SAME", jnp.float32, False),  # conv_out
        ((4, 32, 32, 128), (3, 3, 128, 128), (1, 1), "VALID", jnp.float32, False),
        ((4, 32, 32, 128), (1, 1, 128, 128), (1, 1), "SAME", jnp.float32, False),
        ((4, 32, 32, 128), (3, 3, 128, 128), (1, 1), ((1, 0), (0, 1)), jnp.float32, False),
    ],
)
def test_applies(x_shape, k_shape, strides, padding, dtype, expected):
  assert winograd.applies(x_shape, k_shape, strides, padding, dtype) == expected


def _convolutions(fn, *args, platform):
  return (
      jax.export.export(jax.jit(fn), platforms=(platform,))(*args)
      .mlir_module()
      .count("stablehlo.convolution")
  )


def test_conv3x3_dispatch():
  """conv.conv3x3 is Winograd (no convolution op) where it applies, conv2d elsewhere."""
  x, k = jnp.ones((2, 16, 16, 64)), jnp.ones((3, 3, 64, 64))
  loss = jax.grad(lambda x, k: jnp.sum(conv.conv3x3(x, k) ** 2), argnums=(0, 1))
  assert _convolutions(loss, x, k, platform="cpu") == 0
  # Where it does not apply (stride 2, or 32 channels), the direct conv2d with its
  # chunked weight gradient.
  strided = jax.grad(lambda x, k: jnp.sum(conv.conv3x3(x, k, (2, 2)) ** 2), argnums=(0, 1))
  assert _convolutions(strided, x, k, platform="cpu") > 0
  x, k = jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 32))
  assert _convolutions(loss, x, k, platform="cpu") > 0


def test_conv3x3_matches_direct_on_a_unet_shape():
  """conv.conv3x3 on a U-Net shape (Winograd on CPU) against the float64 sum over taps."""
  rng = np.random.RandomState(3)
  x = jnp.asarray(rng.randn(2, 16, 16, 64), jnp.float32)
  k = jnp.asarray(rng.randn(3, 3, 64, 128) / 24.0, jnp.float32)
  y = conv.conv3x3(x, k)
  ref = np_conv(np.asarray(x), np.asarray(k), (1, 1), "SAME")
  np.testing.assert_allclose(np.asarray(y), ref, atol=5e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.slow
def test_unet_gradients_with_and_without_cpu_kernels():
  """A U-Net whose 16x16 64-channel convs take Winograd with the CPU kernels: loss and
  parameter gradients (dropout and remat on) equal those of the plain model to float32
  rounding (the plain model is the reference: nn.Conv, nn.GroupNorm, jax.random masks)."""
  from ddpm_jax.models import unet  # pylint: disable=g-import-not-at-top

  plain = unet.UNet(ch=64, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), remat=True)
  rng = np.random.RandomState(6)
  x = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  t = jnp.asarray([10, 900], jnp.int32)
  eps = jnp.asarray(rng.randn(2, 16, 16, 3), jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  params = plain.init(jax.random.PRNGKey(0), x, t)["params"]
  # A non-zero output conv (it starts at 1e-10), so that every layer gets a real gradient.
  params["conv_out"]["kernel"] = 0.05 * jax.random.normal(
      jax.random.PRNGKey(2), params["conv_out"]["kernel"].shape
  )

  def loss_and_grads(model):
    loss = lambda p: jnp.mean(
        (model.apply({"params": p}, x, t, train=True, dropout_keys=keys) - eps) ** 2
    )
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    return compiled(params), compiled.as_text().count(" convolution(")

  (loss_on, grads_on), convs_on = loss_and_grads(plain.clone(cpu_kernels=True))
  (loss_off, grads_off), convs_off = loss_and_grads(plain)
  # Winograd replaced convolutions (conv_in's 3 channels and the 8x8 level keep XLA's).
  assert 0 < convs_on < convs_off
  np.testing.assert_allclose(float(loss_on), float(loss_off), rtol=1e-5)
  leaves = list(zip(jax.tree_util.tree_leaves(grads_on), jax.tree_util.tree_leaves(grads_off)))
  overall = max(float(jnp.max(jnp.abs(b))) for _, b in leaves)
  for a, b in leaves:
    # Per leaf, relative to its own scale; a few leaves' gradients are rounding noise
    # (1e-15) around an exact zero, and are held to the overall scale instead.
    scale = max(float(jnp.max(jnp.abs(b))), 1e-6 * overall)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * scale, rtol=0)
