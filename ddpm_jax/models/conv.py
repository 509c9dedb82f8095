"""2-D convolution whose weight gradient is computed in batch chunks on XLA:CPU.

The weight gradient of a convolution sums over the whole batch:
``dW[i, j] = sum_{b, h, w} x_pad[b, h + i, w + j, :]^T dy[b, h, w, :]``. XLA:CPU
(jaxlib 0.10) computes it as one convolution whose window is the whole image,
and that kernel slows down sharply once its operands leave the core's L2
cache: for 128 channels at 32x32 it took 7 ms for 2 images, 27 ms for 4 and
205 ms for 16 (per device, both devices of the 2-core development host busy).
Summing the weight
gradients of chunks of the batch, each small enough to stay in cache, computed
the same sum 1.2-3x faster for most of the U-Nets' convs
(``benchmarks/conv_weight_grad.py --shapes=...``). The forward pass and the
input gradient are left to XLA: they run near the core's peak, and chunking
them was slower.

On other platforms the gradient is XLA's own (``jax.lax.platform_dependent``),
so GPU and TPU programs are unchanged.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from ddpm_jax.models import conv_timing, winograd

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# Bytes of one chunk's largest operand (x or dy) in the chunked weight gradient:
# a quarter of the 2 MiB L2 cache of a core of the development host. Budgets of
# 256 KiB to 1 MiB made the CIFAR-10 train step 1.07-1.14x faster; 2 MiB only
# 1.02x (benchmarks/conv_weight_grad.py).
CPU_WEIGHT_GRAD_CHUNK_BYTES = 1 << 19

# Whether 3x3 stride-1 convs go through Winograd's F(4x4, 3x3) on CPU where
# ``winograd.applies``, or where it was measured faster on this host (read when
# the program is traced; see models/winograd.py and models/conv_timing.py).
CPU_WINOGRAD = True

# Below this many output channels the weight gradient is cheap and XLA's single
# convolution was faster than chunks (the 128 -> 3 output conv: 12 ms against 25-72 ms).
_MIN_CHUNKED_FEATURES = 16

Padding = Union[str, Sequence[Sequence[int]]]


def _plain(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=DIMENSION_NUMBERS)


def weight_grad_chunk(x_shape: Sequence[int], out_features: int, itemsize: int,
                      budget: Optional[int] = None) -> int:
  """Examples per chunk of the CPU weight gradient: a divisor of the batch size.

  The largest divisor ``c`` of B with ``c * H * W * max(Cin, Cout) * itemsize <=
  budget`` (at least 1). The whole batch when ``out_features`` is small or
  ``budget <= 0``. ``budget`` defaults to the module's
  ``CPU_WEIGHT_GRAD_CHUNK_BYTES``, read when the program is traced.
  """
  B, H, W, c_in = x_shape
  budget = CPU_WEIGHT_GRAD_CHUNK_BYTES if budget is None else budget
  if out_features < _MIN_CHUNKED_FEATURES or budget <= 0:
    return B
  fits = max(1, budget // (H * W * max(c_in, out_features) * itemsize))
  return max(c for c in range(1, B + 1) if B % c == 0 and c <= fits)


def chunked_weight_grad(x: jax.Array, dy: jax.Array, kernel: jax.Array, strides, padding,
                        chunk: int) -> jax.Array:
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
    xs, dys = x[start:start + chunk], dy[start:start + chunk]
    _, vjp = jax.vjp(lambda k, xs=xs: _plain(xs, k, strides, padding), kernel)
    part = vjp(dys)[0].astype(jnp.float32)
    total = part if total is None else total + part
  return total.astype(kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple = (1, 1),
           padding: Padding = "SAME") -> jax.Array:
  """``lax.conv_general_dilated`` in NHWC / HWIO, with a cache-friendly weight gradient on CPU.

  Args:
    x: ``[B, H, W, Cin]``; kernel: ``[kh, kw, Cin, Cout]``, same dtype as x.
    strides: ``(sh, sw)``; padding: ``'SAME'``, ``'VALID'`` or ``((lo, hi), (lo, hi))``
      (hashable: a string or a tuple of tuples).

  Returns ``[B, H', W', Cout]``: the convolution, exactly as lax computes it.
  The gradient with respect to x is lax's; with respect to the kernel it is
  summed over chunks of :func:`weight_grad_chunk` examples on CPU, and lax's
  elsewhere (equal up to float rounding).
  """
  return _plain(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
  return _plain(x, kernel, strides, padding), (x, kernel)


def _conv2d_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  _, vjp = jax.vjp(lambda x_, k_: _plain(x_, k_, strides, padding), x, kernel)

  def xla_grads(dy):
    return vjp(dy)

  def cpu_grads(dy):
    dx, dk = vjp(dy)  # XLA drops the whole-batch kernel gradient when it is replaced
    chunk = weight_grad_chunk(x.shape, kernel.shape[-1], jnp.dtype(x.dtype).itemsize)
    if chunk < x.shape[0]:
      dk = chunked_weight_grad(x, dy, kernel, strides, padding, chunk)
    return dx, dk

  return jax.lax.platform_dependent(dy, cpu=cpu_grads, default=xla_grads)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv3x3(x: jax.Array, kernel: jax.Array, strides: tuple = (1, 1),
            padding: Padding = "SAME") -> jax.Array:
  """A 3x3 convolution: :func:`winograd.conv3x3` on CPU where it is faster, else :func:`conv2d`.

  Args and result as :func:`conv2d`. Which one runs is decided from the static
  shapes and dtype when the program is traced (``CPU_WINOGRAD``, then
  ``winograd.applies``, or for 32-63 channels ``winograd.worth_measuring`` and
  a measurement on this host, ``conv_timing.winograd_is_faster``), and then
  for the platform when it is lowered: GPU and TPU programs always get
  :func:`conv2d`.
  """
  def direct(x, kernel):
    return conv2d(x, kernel, strides, padding)

  args = (x.shape, kernel.shape, strides, padding, x.dtype)
  use = CPU_WINOGRAD and (
      winograd.applies(*args)
      or (winograd.worth_measuring(*args)
          and conv_timing.winograd_is_faster(x.shape, kernel.shape[-1], x.dtype, direct,
                                             winograd.conv3x3)))
  if not use:
    return direct(x, kernel)
  return jax.lax.platform_dependent(x, kernel, cpu=winograd.conv3x3, default=direct)
