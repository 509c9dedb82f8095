"""The U-Net's Upsample conv for XLA:CPU: a 3x3 conv of the 2x nearest upsampling, in one go.

The plain model repeats every pixel 2x2 and convolves the 4x larger result. Each
of the four output phases (row parity a, column parity b) only ever sees 2x2
distinct input pixels, so it is a 2x2 conv of the small input whose taps are
sums of the 3x3 taps: 16 instead of 36 multiply-adds per input pixel and
channel pair, and the upsampled input is never built. The result equals the
plain form up to float rounding.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ddpm_jax.cpu import conv


def _two_phase_taps(kernel: jax.Array, axis: int) -> tuple:
  """3 taps along ``axis`` -> the 2-tap kernels of the even and odd output phases.

  On a 2x nearest-upsampled input, output 2i reads input rows (i-1, i, i) through
  taps (0, 1, 2), and output 2i+1 reads rows (i, i, i+1); taps that read the same
  row are summed.
  """
  t0, t1, t2 = (jnp.take(kernel, i, axis=axis) for i in range(3))
  return jnp.stack([t0, t1 + t2], axis=axis), jnp.stack([t0 + t1, t2], axis=axis)


def upsample2x_conv3x3(
    x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array] = None
) -> jax.Array:
  """3x3 'SAME' conv of the 2x nearest-neighbour upsampling of ``x``, without upsampling.

  Args:
    x: ``[B, H, W, Cin]``, any float dtype (the computation dtype).
    kernel: ``[3, 3, Cin, Cout]`` (HWIO); bias: ``[Cout]`` or None. Taps are
      summed in the kernel's dtype (float32 for the model's parameters), then
      cast to ``x``'s.

  Returns:
    ``[B, 2H, 2W, Cout]``, equal up to float rounding to
    ``conv3x3(repeat(repeat(x, 2, axis=1), 2, axis=2))``.
  """
  B, H, W, _ = x.shape
  rows = []
  for a, k_a in enumerate(_two_phase_taps(kernel, 0)):
    cols = []
    for b, k_ab in enumerate(_two_phase_taps(k_a, 1)):
      # Phase a reads input rows (i-1, i) if a == 0, else (i, i+1): pad before or after.
      padding = ((1, 0) if a == 0 else (0, 1), (1, 0) if b == 0 else (0, 1))
      cols.append(conv.conv2d(x, k_ab.astype(x.dtype), (1, 1), padding))
    rows.append(jnp.stack(cols, axis=3))  # [B, H, W, 2 (b), Cout]
  y = jnp.stack(rows, axis=2)  # [B, H, 2 (a), W, 2 (b), Cout]
  y = y.reshape(B, 2 * H, 2 * W, kernel.shape[-1])
  return y if bias is None else y + bias.astype(x.dtype)
