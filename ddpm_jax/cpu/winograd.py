"""3x3 stride-1 convolution by Winograd's minimal filtering, F(4x4, 3x3), for XLA:CPU.

A 3x3 convolution computes each output pixel with 9 multiply-adds per input
channel. Winograd's F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016) cuts every 4x4 block of output from 6x6
input tiles with 36 instead of 144 multiplications per channel pair, 4x fewer:

  Y = A^T [ (G g G^T) * (B^T d B) ] A     for each 6x6 tile d and 3x3 kernel g,

where ``*`` is elementwise and the sum over input channels happens inside the
brackets, so the whole convolution becomes 36 independent matrix products
``V[p] @ U[p]`` (``V[p]: [tiles, Cin]``, ``U[p]: [Cin, Cout]``). Those run at
the core's matmul speed; the tile transforms around them are cheap adds, and
the kernel transform is one small matrix product.

On the 2-core development host, XLA:CPU's own convolution runs near the core's
peak, so this wins by doing fewer FLOPs, not faster ones. Where it helps is
decided by :func:`applies` (measured with ``benchmarks/cpu/winograd_conv.py``).
The backward pass is written by hand (``autodiff.defvjp``, which keeps
``jax.jvp`` working): the gradient of the transforms is another set of adds,
and both gradients are again 36 matrix products of the same sizes.

Numerics: the transforms scale values by up to 8x and add them, so the result
differs from a direct convolution by rounding only: the largest error was
about 1e-5 of the output's largest value in float32, against 1e-6 for XLA's
direct convolution (both against a float64 sum, 128-256 channels). cuDNN
offers Winograd convolutions for float32 too. Only float32 uses it here;
bfloat16's 8-bit mantissa would make those errors visible.

The constants are the transforms for the interpolation points 0, 1, -1, 2, -2
and infinity, in float64 as in the paper's code base, cast when used.
"""

from __future__ import annotations

from typing import List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.cpu import autodiff

# Input transform B^T [6, 6], kernel transform G [6, 3], output transform A^T [4, 6].
BT = np.array(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    np.float64,
)
G = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    np.float64,
)
AT = np.array(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64
)

TILE = 4  # output pixels per tile side; input tiles are TILE + 2 = 6 wide

# G g G^T for all 36 components (j, i) at once, as a [36, 9] matrix on the taps
# (r, s) of the kernel flattened row-major: U[(j, i)] = sum_rs G[i, r] G[j, s] g[r, s].
KERNEL_MATRIX = np.einsum("ir,js->jirs", G, G).reshape(36, 9)

# Smallest image side, fewest channels on either side, and fewest input plus output
# channels that use it: a shape rule, the same on every host (measurements:
# docs/cpu_kernels.md).
MIN_SIDE = 16
MIN_CHANNELS = 32
MIN_CHANNELS_IN_PLUS_OUT = 96


def _fits(x_shape: Sequence[int], kernel_shape: Sequence[int], strides, padding, dtype) -> bool:
  """3x3, stride 1, 'SAME', float32, sides multiples of 4 and at least ``MIN_SIDE``."""
  _, h, w, _ = x_shape
  kh, kw, _, _ = kernel_shape
  same = padding == "SAME" or tuple(map(tuple, padding)) == ((1, 1), (1, 1))
  return bool(
      (kh, kw) == (3, 3)
      and tuple(strides) == (1, 1)
      and same
      and jnp.dtype(dtype) == jnp.float32
      and h % TILE == 0
      and w % TILE == 0
      and min(h, w) >= MIN_SIDE
  )


def applies(x_shape: Sequence[int], kernel_shape: Sequence[int], strides, padding, dtype) -> bool:
  """Whether ``ddpm_jax.cpu.conv.conv3x3`` computes this convolution with :func:`conv3x3`.

  Only 3x3 kernels at stride 1 with one pixel of zero padding on each side
  ('SAME'), float32, sides that are multiples of 4 and at least ``MIN_SIDE``,
  and at least ``MIN_CHANNELS`` input and output channels, together at least
  ``MIN_CHANNELS_IN_PLUS_OUT`` (32 -> 64 and 64 -> 32 do, 32 -> 32 does not).
  """
  c_in, c_out = x_shape[-1], kernel_shape[-1]
  return (
      _fits(x_shape, kernel_shape, strides, padding, dtype)
      and min(c_in, c_out) >= MIN_CHANNELS
      and c_in + c_out >= MIN_CHANNELS_IN_PLUS_OUT
  )


def _combine(matrix: np.ndarray, parts: List[jax.Array]) -> List[jax.Array]:
  """``[sum_j matrix[i, j] * parts[j] for i]``, skipping zeros and unit factors.

  Every row of the transforms (and of their transposes) has a non-zero entry.
  """
  out = []
  for row in matrix:
    acc = None
    for c, p in zip(row, parts):
      if c == 0:
        continue
      term = p if c == 1 else -p if c == -1 else p * np.asarray(c, p.dtype)
      acc = term if acc is None else acc + term
    out.append(acc)
  return out


def _tile_taps(a: jax.Array, axis: int) -> List[jax.Array]:
  """The 6 taps of every input tile along ``axis``.

  a: size ``4 * (n + 1)`` along ``axis`` (the image padded by 1 before and 3
  after). Returns 6 arrays of size n along ``axis``; tap r of tile j is
  ``a[4 * j + r]``.
  """
  n = a.shape[axis] // TILE - 1
  groups = a.reshape(a.shape[:axis] + (n + 1, TILE) + a.shape[axis + 1 :])
  lo = jax.lax.slice_in_dim(groups, 0, n, axis=axis)
  hi = jax.lax.slice_in_dim(groups, 1, n + 1, axis=axis)
  tap = lambda g, r: jnp.take(g, r, axis=axis + 1)
  return [tap(lo, r) for r in range(TILE)] + [tap(hi, 0), tap(hi, 1)]


def _overlap_add(parts: List[jax.Array], axis: int, size: int) -> jax.Array:
  """The transpose of :func:`_tile_taps`, cropped to the unpadded image.

  parts: 6 arrays with n tiles along ``axis``; tap r of tile j is added into
  padded position ``4 * j + r``. Returns size ``size = 4 * n`` along ``axis``:
  padded positions 1 .. size.
  """
  n = parts[0].shape[axis]
  zero = jnp.zeros_like(parts[0])
  pad = [(0, 0)] * parts[0].ndim
  lo_pad, hi_pad = list(pad), list(pad)
  lo_pad[axis], hi_pad[axis] = (0, 1), (1, 0)
  lo = jnp.stack([jnp.pad(p, lo_pad) for p in parts[:TILE]], axis=axis + 1)
  hi = jnp.stack([jnp.pad(p, hi_pad) for p in parts[TILE:] + [zero, zero]], axis=axis + 1)
  full = (lo + hi).reshape(parts[0].shape[:axis] + (TILE * (n + 1),) + parts[0].shape[axis + 1 :])
  return jax.lax.slice_in_dim(full, 1, 1 + size, axis=axis)


# The 36 transformed components are ordered (j, i): column (W) component
# major, row (H) component minor. Every stack below is along the leading axis,
# which XLA:CPU writes as plain blocks; a stack along an inner axis made the
# input transform 2x slower.


def input_transform(x: jax.Array) -> jax.Array:
  """x: ``[B, H, W, C]`` -> ``B^T d B`` of every tile: ``[36, B * H/4 * W/4, C]``."""
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, TILE - 1), (1, TILE - 1), (0, 0)))
  rows = jnp.stack(_combine(BT, _tile_taps(xp, 1)))  # [6 (i), B, h, W + 4, C]
  v = jnp.stack(_combine(BT, _tile_taps(rows, 3)))  # [6 (j), 6 (i), B, h, w, C]
  return v.reshape(36, b * (h // TILE) * (w // TILE), c)


def input_transform_transpose(dv: jax.Array, x_shape: Sequence[int]) -> jax.Array:
  """The transpose (gradient) of :func:`input_transform`: ``[36, T, C]`` -> ``[B, H, W, C]``."""
  b, h, w, c = x_shape
  dv = dv.reshape(6, 6, b, h // TILE, w // TILE, c)
  cols = _combine(BT.T, [dv[j] for j in range(6)])  # 6 x [6 (i), B, h, w, C]
  dw = _overlap_add(cols, 3, w)  # [6 (i), B, h, W, C]
  rows = _combine(BT.T, [dw[i] for i in range(6)])  # 6 x [B, h, W, C]
  return _overlap_add(rows, 1, h)  # [B, H, W, C]


def kernel_transform(kernel: jax.Array) -> jax.Array:
  """kernel: ``[3, 3, Cin, Cout]`` -> ``G g G^T``: ``[36, Cin, Cout]``.

  One matrix product of ``KERNEL_MATRIX`` with the 9 taps: a single pass over
  the kernel. On XLA:CPU it was 1.3-1.8x faster than two separable passes of
  adds (3.4x for the transpose) and made the CIFAR-10 train step 1.02-1.11x
  faster (``benchmarks/cpu/winograd_kernel_transform.py``). For the image tiles the
  separable adds stay: as [36, 36] products they were slower.
  """
  c_in, c_out = kernel.shape[2:]
  u = jnp.dot(
      jnp.asarray(KERNEL_MATRIX, kernel.dtype),
      kernel.reshape(9, c_in * c_out),
      precision=jax.lax.Precision.HIGHEST,
  )
  return u.reshape(36, c_in, c_out)


def kernel_transform_transpose(du: jax.Array) -> jax.Array:
  """The transpose of :func:`kernel_transform`: ``[36, Cin, Cout]`` -> ``[3, 3, Cin, Cout]``."""
  c_in, c_out = du.shape[1:]
  g = jnp.dot(
      jnp.asarray(KERNEL_MATRIX.T, du.dtype),
      du.reshape(36, c_in * c_out),
      precision=jax.lax.Precision.HIGHEST,
  )
  return g.reshape(3, 3, c_in, c_out)


def output_transform(m: jax.Array, y_shape: Sequence[int]) -> jax.Array:
  """``A^T m A`` of every tile: ``[36, T, Cout]`` -> ``[B, H, W, Cout]``."""
  b, h, w, c = y_shape
  m = m.reshape(6, 6, b, h // TILE, w // TILE, c)
  cols = _combine(AT, [m[j] for j in range(6)])  # 4 (q) x [6 (i), B, h, w, C]
  y = jnp.stack(
      [jnp.stack(_combine(AT, [col[i] for i in range(6)]), axis=2) for col in cols], axis=4
  )  # [B, h, 4 (p), w, 4 (q), C]
  return y.reshape(b, h, w, c)


def output_transform_transpose(dy: jax.Array) -> jax.Array:
  """The transpose of :func:`output_transform`: ``[B, H, W, C]`` -> ``[36, T, C]``."""
  b, h, w, c = dy.shape
  tiles = dy.reshape(b, h // TILE, TILE, w // TILE, TILE, c)
  cols = _combine(AT.T, [tiles[:, :, :, :, q] for q in range(TILE)])  # 6 (j) x [B, h, 4, w, C]
  dm = jnp.stack([jnp.stack(_combine(AT.T, [col[:, :, p] for p in range(TILE)])) for col in cols])
  return dm.reshape(36, -1, c)  # [6 (j), 6 (i), B, h, w, C]


def _products(v: jax.Array, u: jax.Array) -> jax.Array:
  """v: ``[36, T, Cin]``, u: ``[36, Cin, Cout]`` -> ``[36, T, Cout]`` in float32."""
  return jnp.einsum("ptc,pco->pto", v, u, preferred_element_type=jnp.float32).astype(v.dtype)


@jax.custom_jvp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A 3x3, stride-1, 'SAME' convolution in NHWC / HWIO by F(4x4, 3x3).

  Args:
    x: ``[B, H, W, Cin]`` float32, H and W multiples of 4.
    kernel: ``[3, 3, Cin, Cout]``, same dtype.

  Returns ``[B, H, W, Cout]``: ``lax.conv_general_dilated(x, kernel, (1, 1),
  'SAME')`` up to float rounding (see the module docstring).
  """
  return _conv3x3_fwd(x, kernel)[0]


def _conv3x3_fwd(x, kernel):
  v = input_transform(x)
  u = kernel_transform(kernel.astype(x.dtype))
  y = output_transform(_products(v, u), x.shape[:3] + (kernel.shape[-1],))
  return y, (v, u)


def _conv3x3_bwd(residuals, dy):
  v, u = residuals
  x_shape = dy.shape[:3] + (v.shape[-1],)
  dm = output_transform_transpose(dy)  # [36, T, Cout]
  dv = jnp.einsum("pto,pco->ptc", dm, u, preferred_element_type=jnp.float32).astype(dm.dtype)
  du = jnp.einsum("ptc,pto->pco", v, dm, preferred_element_type=jnp.float32).astype(dm.dtype)
  return input_transform_transpose(dv, x_shape), kernel_transform_transpose(du)


autodiff.defvjp(conv3x3, _conv3x3_fwd, _conv3x3_bwd)
