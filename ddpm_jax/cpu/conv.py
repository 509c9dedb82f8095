"""The U-Net's 3x3 convolutions for XLA:CPU: Winograd where it applies, chunked weight gradients.

The weight gradient of a convolution sums over the whole batch:
``dW[i, j] = sum_{b, h, w} x_pad[b, h + i, w + j, :]^T dy[b, h, w, :]``. XLA:CPU
computes it as one convolution whose window is the whole image, and that
kernel slows down sharply once its operands leave the core's L2 cache.
:func:`conv2d` sums the weight gradients of chunks of the batch instead, each
small enough to stay in cache; the forward pass and the input gradient are
XLA's. :func:`conv3x3` uses Winograd's F(4x4, 3x3) (``winograd.py``) for the
shapes where ``winograd.applies``, and computes outputs of at most
``MAX_MATMUL_OUTPUT_PIXELS`` pixels as one matrix product of the shifted copies
of the input (:func:`conv_as_matmul`): XLA:CPU's
convolution is 2-13x slower than that product on 2x2 outputs (the lowest level
of the digits U-Net). Both are rules on static shapes only.

Both differ from XLA's convolution by float rounding only. Only the U-Net built
with ``cpu_kernels=True`` calls this module (see ``ddpm_jax/cpu/__init__.py``).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from ddpm_jax.cpu import autodiff
from ddpm_jax.cpu import winograd

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# Bytes of one chunk's largest operand (x or dy) in the chunked weight gradient.
WEIGHT_GRAD_CHUNK_BYTES = 1 << 19

# Below this many output channels the weight gradient is cheap and XLA's single
# convolution is kept (the output conv to 1 or 3 channels).
MIN_CHUNKED_FEATURES = 16

# Outputs with at most this many pixels (2x2) are computed as one matrix product.
MAX_MATMUL_OUTPUT_PIXELS = 4

Padding = Union[str, Sequence[Sequence[int]]]


def _plain(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=DIMENSION_NUMBERS
  )


def weight_grad_chunk(
    x_shape: Sequence[int], out_features: int, itemsize: int, budget: Optional[int] = None
) -> int:
  """Examples per chunk of the weight gradient: a divisor of the batch size.

  The largest divisor ``c`` of B with ``c * H * W * max(Cin, Cout) * itemsize <=
  budget`` (at least 1); the whole batch when ``out_features`` is below
  ``MIN_CHUNKED_FEATURES`` or ``budget <= 0``.

  Args: x_shape: (B, H, W, Cin); out_features: Cout; itemsize: bytes per element;
    budget: bytes (default ``WEIGHT_GRAD_CHUNK_BYTES``).
  """
  B, H, W, c_in = x_shape
  budget = WEIGHT_GRAD_CHUNK_BYTES if budget is None else budget
  if out_features < MIN_CHUNKED_FEATURES or budget <= 0:
    return B
  fits = max(1, budget // (H * W * max(c_in, out_features) * itemsize))
  return max(c for c in range(1, B + 1) if B % c == 0 and c <= fits)


def chunked_weight_grad(
    x: jax.Array, dy: jax.Array, kernel: jax.Array, strides, padding, chunk: int
) -> jax.Array:
  """The kernel's gradient of ``conv(x, kernel)`` for cotangent ``dy``, summed over batch chunks.

  Args:
    x: ``[B, H, W, Cin]``; dy: ``[B, H', W', Cout]`` (the output's cotangent);
    kernel: ``[kh, kw, Cin, Cout]`` (only its shape and dtype are used);
    chunk: examples per chunk, dividing B.

  Returns ``[kh, kw, Cin, Cout]`` in the kernel's dtype; the chunks' partial
  sums are added in float32.
  """
  B = x.shape[0]
  total = None
  for start in range(0, B, chunk):
    xs, dys = x[start : start + chunk], dy[start : start + chunk]
    _, vjp = jax.vjp(lambda k, xs=xs: _plain(xs, k, strides, padding), kernel)
    part = vjp(dys)[0].astype(jnp.float32)
    total = part if total is None else total + part
  return total.astype(kernel.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def conv2d(
    x: jax.Array, kernel: jax.Array, strides: tuple = (1, 1), padding: Padding = "SAME"
) -> jax.Array:
  """``lax.conv_general_dilated`` in NHWC / HWIO, with the weight gradient summed over chunks.

  Args:
    x: ``[B, H, W, Cin]``; kernel: ``[kh, kw, Cin, Cout]``, same dtype as x.
    strides: ``(sh, sw)``; padding: ``'SAME'``, ``'VALID'`` or ``((lo, hi), (lo, hi))``
      (hashable: a string or a tuple of tuples).

  Returns ``[B, H', W', Cout]``: the convolution, exactly as lax computes it.
  The gradient with respect to x is lax's; with respect to the kernel it is
  summed over chunks of :func:`weight_grad_chunk` examples (equal to lax's up
  to float rounding). Forward mode (``jax.jvp``, ``jax.linearize``) works too:
  its tangent is the transpose of that backward pass (``autodiff.defvjp``).
  """
  return _plain(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
  return _plain(x, kernel, strides, padding), (x, kernel)


def _conv2d_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  _, vjp = jax.vjp(lambda x_, k_: _plain(x_, k_, strides, padding), x, kernel)
  dx, dk = vjp(dy)  # XLA drops the whole-batch kernel gradient when it is replaced
  chunk = weight_grad_chunk(x.shape, kernel.shape[-1], jnp.dtype(x.dtype).itemsize)
  if chunk < x.shape[0]:
    dk = chunked_weight_grad(x, dy, kernel, strides, padding, chunk)
  return dx, dk


autodiff.defvjp(conv2d, _conv2d_fwd, _conv2d_bwd)


def _pads_and_output_size(x_shape, k_shape, strides, padding):
  """(``((top, bottom), (left, right))``, ``(H', W')``) of the convolution, as lax pads it."""
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x_shape[1:3], k_shape[:2], strides, padding)
  out = tuple(
      (size + lo + hi - window) // stride + 1
      for size, (lo, hi), window, stride in zip(x_shape[1:3], padding, k_shape[:2], strides)
  )
  return tuple(map(tuple, padding)), out


def conv_as_matmul(
    x: jax.Array, kernel: jax.Array, strides: tuple = (1, 1), padding: Padding = "SAME"
) -> jax.Array:
  """A convolution as one matrix product of the ``kh * kw`` shifted copies of ``x``.

  Args and result as :func:`conv2d`; equal to lax's convolution up to float
  rounding. The gradients are JAX's of the slices and the product.
  """
  B, _, _, c_in = x.shape
  kh, kw, _, c_out = kernel.shape
  sh, sw = strides
  pads, (Ho, Wo) = _pads_and_output_size(x.shape, kernel.shape, strides, padding)
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  taps = [
      xp[:, i : i + (Ho - 1) * sh + 1 : sh, j : j + (Wo - 1) * sw + 1 : sw, :]
      for i in range(kh)
      for j in range(kw)
  ]
  cols = jnp.concatenate(taps, axis=-1).reshape(B * Ho * Wo, kh * kw * c_in)
  y = cols @ kernel.reshape(kh * kw * c_in, c_out)
  return y.reshape(B, Ho, Wo, c_out)


def matmul_applies(
    x_shape: Sequence[int], k_shape: Sequence[int], strides: Sequence[int], padding: Padding
) -> bool:
  """Whether :func:`conv3x3` uses :func:`conv_as_matmul`: outputs of at most 2x2 pixels.

  Args: x_shape: ``(B, H, W, Cin)``; k_shape: ``(kh, kw, Cin, Cout)``; strides and
  padding as :func:`conv2d`.
  """
  _, (Ho, Wo) = _pads_and_output_size(x_shape, k_shape, strides, padding)
  return Ho * Wo <= MAX_MATMUL_OUTPUT_PIXELS


def conv3x3(
    x: jax.Array, kernel: jax.Array, strides: tuple = (1, 1), padding: Padding = "SAME"
) -> jax.Array:
  """A 3x3 convolution: Winograd, one matrix product or :func:`conv2d`, by static shape.

  ``winograd.conv3x3`` where ``winograd.applies``, :func:`conv_as_matmul` where
  :func:`matmul_applies` (outputs of at most 2x2), :func:`conv2d` elsewhere.
  Args and result as :func:`conv2d`; the choice depends on the static shapes,
  strides, padding and dtype only.
  """
  if winograd.applies(x.shape, kernel.shape, strides, padding, x.dtype):
    return winograd.conv3x3(x, kernel)
  if matmul_applies(x.shape, kernel.shape, strides, padding):
    return conv_as_matmul(x, kernel, strides, padding)
  return conv2d(x, kernel, strides, padding)
