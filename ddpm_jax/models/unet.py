"""The DDPM U-Net (Ho, Jain & Abbeel 2020) in Flax, NHWC.

This is the PixelCNN++-style Wide-ResNet U-Net of the paper's released TF code
(``diffusion_tf/models/unet.py``): the same blocks, in the same order, with the
same initialisers, so that the released checkpoints map one-to-one onto this
parameter tree and the CIFAR-10 model has exactly 35,746,307 parameters.

Architecture (``L = len(ch_mult)``, ``R = num_res_blocks``)::

    temb  = dense1(swish(dense0(sinusoid(t, ch))))          # [B, 4*ch]
            (+ class_emb(y) if num_classes is set)            # extension, not in the paper
    hs    = [conv_in(x)]
    for i in 0..L-1:                                          # down path
        for j in 0..R-1:
            h = down_{i}_block_{j}(hs[-1], temb)              # out = ch*ch_mult[i]
            if H(h) in attn_resolutions: h = down_{i}_attn_{j}(h)
            hs.append(h)
        if i != L-1: hs.append(down_{i}_downsample(hs[-1]))
    h = mid_block_2(mid_attn_1(mid_block_1(hs[-1], temb)), temb)
    for i in L-1..0:                                          # up path
        for j in 0..R:
            h = up_{i}_block_{j}(concat([h, hs.pop()], -1), temb)
            if H(h) in attn_resolutions: h = up_{i}_attn_{j}(h)
        if i != 0: h = up_{i}_upsample(h)
    out = conv_out(swish(norm_out(h)))

Parameter naming (``variables['params']``). Every top-level name is the TF
variable scope with ``/`` replaced by ``_`` (TF ``model/down_0/block_1/conv1/W``
is ``params['down_0_block_1']['conv1']['kernel']`` here):

* ``temb_dense0``, ``temb_dense1``: ``nn.Dense`` (TF ``temb/dense0``, ``temb/dense1``).
* ``class_emb``: ``nn.Embed`` ``{'embedding': [num_classes, 4*ch]}``; only when
  ``num_classes`` is set (not part of the paper's models).
* ``conv_in``, ``conv_out``: ``nn.Conv`` 3x3.
* ``down_{i}_block_{j}``, ``mid_block_1``, ``mid_block_2``, ``up_{i}_block_{j}``:
  :class:`ResnetBlock` with ``norm1`` (GroupNorm), ``conv1`` (3x3 Conv),
  ``temb_proj`` (Dense), ``norm2`` (GroupNorm), ``conv2`` (3x3 Conv) and, only
  when the input and output channel counts differ, ``nin_shortcut`` (Dense over
  channels, i.e. the TF ``nin``).
* ``down_{i}_attn_{j}``, ``mid_attn_1``, ``up_{i}_attn_{j}``: :class:`AttnBlock`
  with ``norm`` (GroupNorm), ``q``, ``k``, ``v``, ``proj_out`` (Dense over channels).
* ``down_{i}_downsample``, ``up_{i}_upsample``: hold a single 3x3 ``conv``
  (absent when ``resamp_with_conv=False``).
* ``norm_out``: GroupNorm.

Leaf names follow Flax: Conv/Dense ``kernel`` (TF ``W``; same layout:
conv ``[3, 3, in, out]``, dense/nin ``[in, out]``) and ``bias`` (TF ``b``);
GroupNorm ``scale`` (TF ``gamma``) and ``bias`` (TF ``beta``).

Initialisation follows the paper's ``default_init(scale)`` =
``variance_scaling(scale, 'fan_avg', 'uniform')`` with zero biases; the layers the
paper initialises with ``init_scale=0`` (``conv2`` of every ResnetBlock,
``proj_out`` of every AttnBlock, and ``conv_out``) use scale ``1e-10``, exactly as
the paper's ``default_init`` maps 0 to 1e-10.
"""

from __future__ import annotations

import math
from typing import Any, Optional
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models import conv, conv_timing, winograd
from ddpm_jax.models import dropout as dropout_masks

__all__ = [
    "UNet",
    "ResnetBlock",
    "AttnBlock",
    "GroupNorm",
    "group_norm",
    "Downsample",
    "Upsample",
    "default_init",
    "get_timestep_embedding",
    "count_params",
]

# GroupNorm settings of the paper (tf.contrib.layers.group_norm defaults).
GN_GROUPS = 32
GN_EPS = 1e-6


def default_init(scale: float = 1.0):
  """The paper's initialiser: variance_scaling(scale, 'fan_avg', 'uniform').

  As in the paper's ``nn.default_init``, ``scale == 0`` is mapped to 1e-10
  (variance scaling with a zero scale is not allowed).
  """
  scale = 1e-10 if scale == 0 else scale
  return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int) -> jax.Array:
  """Sinusoidal timestep embedding, exactly as ``nn.get_timestep_embedding`` of the paper.

  Args:
    timesteps: ``[B]`` timesteps (ints in ``[0, T)``; any real values are accepted
      and cast to float32).
    embedding_dim: output width ``D`` (>= 4; odd widths are zero-padded by one column).

  Returns:
    ``[B, D]`` float32: ``concat([sin(t * f), cos(t * f)], -1)`` with
    ``f_k = exp(-ln(10000) * k / (D//2 - 1))`` for ``k = 0..D//2-1`` (sin first).
  """
  timesteps = jnp.asarray(timesteps)
  if timesteps.ndim != 1:
    raise ValueError(f"timesteps must have shape [B], got shape {timesteps.shape}")
  half_dim = embedding_dim // 2
  if half_dim < 2:
    raise ValueError(f"embedding_dim must be >= 4, got {embedding_dim}")
  scale = math.log(10000) / (half_dim - 1)
  freqs = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * -scale)
  emb = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def count_params(params: Any) -> int:
  """Total number of scalars in a parameter pytree.

  Works on concrete arrays and on the ``jax.ShapeDtypeStruct`` tree returned by
  ``jax.eval_shape(model.init, ...)``.
  """
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)))


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
               num_groups: int = GN_GROUPS, eps: float = GN_EPS) -> jax.Array:
  """GroupNorm of ``x`` over its spatial axes and each group of channels.

  Args:
    x: ``[B, ..., C]`` float32, ``C`` divisible by ``num_groups``.
    scale, bias: ``[C]`` float32 (TF's ``gamma`` and ``beta``).
    num_groups, eps: the paper's 32 and 1e-6 by default.

  Returns:
    ``[B, ..., C]``: ``(x - mean) / sqrt(var + eps) * scale + bias``, with the
    mean and the two-pass variance E[(x - mean)^2] of each (example, group),
    like TF's ``tf.nn.moments`` (E[x^2] - mean^2 would lose precision when
    |mean| >> std).

  The result is ``flax.linen.GroupNorm(use_fast_variance=False)``'s, arranged
  for XLA:CPU: both reductions run over the spatial axes with the channels as
  the vectorised minor axis, and the step from channels to groups is a tiny
  ``[B, C]`` reshape (see ``benchmarks/group_norm.py``).
  """
  B, C = x.shape[0], x.shape[-1]
  per_group = C // num_groups
  flat = x.reshape(B, -1, C)

  def group_mean(v):  # [B, C] per-channel values -> [B, C] mean over each channel's group
    g = jnp.mean(v.reshape(B, num_groups, per_group), axis=-1, keepdims=True)
    return jnp.broadcast_to(g, (B, num_groups, per_group)).reshape(B, C)

  mean = group_mean(jnp.mean(flat, axis=1))
  centered = flat - mean[:, None, :]
  var = group_mean(jnp.mean(jnp.square(centered), axis=1))
  y = centered * (jax.lax.rsqrt(var + eps) * scale)[:, None, :] + bias
  return y.reshape(x.shape)


class GroupNorm(nn.Module):
  """The paper's GroupNorm (32 groups, eps 1e-6) with float32 ``scale`` and ``bias``.

  Parameters are named, shaped and initialised like ``flax.linen.GroupNorm``'s,
  so checkpoints and converted weights are interchangeable with it.
  """

  num_groups: int = GN_GROUPS  # channel groups
  epsilon: float = GN_EPS  # added to the variance

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x ``[B, ..., C]`` (any float dtype). Returns float32, same shape."""
    C = x.shape[-1]
    if C % self.num_groups:
      raise ValueError(f"GroupNorm: {C} channels are not divisible by {self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (C,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (C,), jnp.float32)
    return group_norm(x.astype(jnp.float32), scale, bias, self.num_groups, self.epsilon)


def _group_norm(x: jax.Array, name: str, dtype: Any) -> jax.Array:
  """GroupNorm(32 groups, eps 1e-6) computed in float32, cast back to ``dtype``."""
  return GroupNorm(name=name)(x).astype(dtype)


class Conv3x3(nn.Module):
  """3x3 conv with TF 'SAME' padding (the paper's ``nn.conv2d``).

  Parameters are ``nn.Conv``'s (``kernel [3, 3, Cin, features]``, ``bias``, same
  initialisers and order). The convolution is :func:`conv.conv3x3`: on CPU,
  Winograd's F(4x4, 3x3) where it is faster (``models/winograd.py``), else
  lax's with the weight gradient summed over cache-sized batch chunks; lax's
  on GPU and TPU.
  """

  features: int  # output channels
  strides: int = 1  # 1, or 2 for the Downsample conv
  init_scale: float = 1.0  # default_init scale of the kernel (0 -> 1e-10)
  dtype: Any = jnp.float32  # computation dtype; params are float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x ``[B, H, W, Cin]``. Returns ``[B, H / strides, W / strides, features]`` in ``dtype``."""
    kernel = self.param("kernel", default_init(self.init_scale),
                        (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    y = conv.conv3x3(x.astype(self.dtype), kernel.astype(self.dtype),
                     (self.strides, self.strides), "SAME")
    return y + bias.astype(self.dtype)


def _conv3x3(features: int, name: str, dtype: Any, init_scale: float = 1.0,
             strides: int = 1) -> Conv3x3:
  """3x3 conv with TF 'SAME' padding (the paper's ``nn.conv2d``)."""
  return Conv3x3(features, strides=strides, init_scale=init_scale, dtype=dtype, name=name)


def _dense(features: int, name: str, dtype: Any, init_scale: float = 1.0) -> nn.Dense:
  """Dense over the last axis (the paper's ``nn.dense`` and ``nn.nin``)."""
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=default_init(init_scale),
      bias_init=nn.initializers.zeros,
      name=name,
  )


def _dropout(h: jax.Array, rate: float, train: bool, keys: Optional[jax.Array], name: str) -> jax.Array:
  """Dropout from the 'dropout' rng stream, or from one key per example.

  With ``keys`` ([B] keys) example b's mask depends only on keys[b] and the
  block's name, not on the batch it sits in.
  """
  if not train or rate == 0.0:
    return h
  if keys is None:
    return nn.Dropout(rate=rate, deterministic=False)(h)
  salt = zlib.crc32(name.encode()) & 0x7FFFFFFF
  block_keys = jax.vmap(lambda k: jax.random.fold_in(k, salt))(keys)
  keep = dropout_masks.keep_mask(block_keys, 1.0 - rate, h.shape[1:])  # = vmapped jax.random.bernoulli
  return jnp.where(keep, h / (1.0 - rate), 0).astype(h.dtype)


class ResnetBlock(nn.Module):
  """Wide-ResNet block with timestep conditioning (the paper's ``resnet_block``).

  ``norm1 -> swish -> conv1 -> + temb_proj(swish(temb)) -> norm2 -> swish ->
  dropout -> conv2``, plus the input (through ``nin_shortcut`` when the
  channel count changes).
  """

  out_ch: int  # output channels (must be divisible by 32)
  dropout: float = 0.0  # dropout rate before conv2 (applied only when train=True)
  dtype: Any = jnp.float32  # computation dtype; params are float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool = False,
               dropout_keys: Optional[jax.Array] = None) -> jax.Array:
    """Args: x ``[B, H, W, C]``; temb ``[B, E]``; train: enables dropout;
    dropout_keys: optional ``[B]`` PRNG keys, one per example (see ``UNet``).

    Returns ``[B, H, W, out_ch]`` in ``dtype``.
    """
    in_ch = x.shape[-1]
    x = x.astype(self.dtype)
    h = nn.swish(_group_norm(x, "norm1", self.dtype))
    h = _conv3x3(self.out_ch, "conv1", self.dtype)(h)
    h = h + _dense(self.out_ch, "temb_proj", self.dtype)(nn.swish(temb.astype(self.dtype)))[:, None, None, :]
    h = nn.swish(_group_norm(h, "norm2", self.dtype))
    h = _dropout(h, self.dropout, train, dropout_keys, self.name)
    h = _conv3x3(self.out_ch, "conv2", self.dtype, init_scale=0.0)(h)
    if in_ch != self.out_ch:
      # Over [B*H*W, C] rows, as in AttnBlock, for a plain weight-gradient dot.
      x = _dense(self.out_ch, "nin_shortcut", self.dtype)(x.reshape(-1, in_ch)).reshape(h.shape)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions (the paper's ``attn_block``)."""

  dtype: Any = jnp.float32  # computation dtype; the softmax is always float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x ``[B, H, W, C]``. Returns ``x + proj_out(attention)``, ``[B, H, W, C]``."""
    B, H, W, C = x.shape
    x = x.astype(self.dtype)
    # The projections see [B*H*W, C] rows: their weight gradients are then plain
    # [C, rows] x [rows, C] dots; over [B, H*W, C] XLA:CPU transposed both
    # operands first (benchmarks/attention.py: the block 1.1-1.25x faster).
    h = _group_norm(x, "norm", self.dtype).reshape(B * H * W, C)
    # 1/sqrt(C) scales q ([B, HW, C]) rather than the logits ([B, HW, HW]): the same product.
    q = (_dense(C, "q", self.dtype)(h) * (C ** -0.5)).reshape(B, H * W, C)
    k = _dense(C, "k", self.dtype)(h).reshape(B, H * W, C)
    v = _dense(C, "v", self.dtype)(h).reshape(B, H * W, C)
    w = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
    w = jax.nn.softmax(w, axis=-1).astype(self.dtype)
    h = jnp.einsum("bqk,bkc->bqc", w, v).reshape(B * H * W, C)
    h = _dense(C, "proj_out", self.dtype, init_scale=0.0)(h)
    return x + h.reshape(B, H, W, C)


class Downsample(nn.Module):
  """Halve H and W: 3x3 stride-2 conv with TF 'SAME' padding, or 2x2 average pooling.

  For even sizes TF/lax 'SAME' pads 0 rows/cols on top/left and 1 on bottom/right.
  """

  with_conv: bool = True  # conv (True) or 2x2 average pool (False)
  dtype: Any = jnp.float32  # computation dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x ``[B, H, W, C]`` with even H, W. Returns ``[B, H/2, W/2, C]``."""
    x = x.astype(self.dtype)
    if self.with_conv:
      return _conv3x3(x.shape[-1], "conv", self.dtype, strides=2)(x)
    return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding="SAME")


def _two_phase_taps(kernel: jax.Array, axis: int) -> tuple:
  """3 taps along ``axis`` -> the 2-tap kernels of the even and odd output phases.

  On a 2x nearest-upsampled input, output 2i reads input rows (i-1, i, i) through
  taps (0, 1, 2), and output 2i+1 reads rows (i, i, i+1); taps that read the same
  row are summed.
  """
  t0, t1, t2 = (jnp.take(kernel, i, axis=axis) for i in range(3))
  return jnp.stack([t0, t1 + t2], axis=axis), jnp.stack([t0 + t1, t2], axis=axis)


def upsample2x_conv3x3(x: jax.Array, kernel: jax.Array,
                       bias: Optional[jax.Array] = None) -> jax.Array:
  """3x3 'SAME' conv of the 2x nearest-neighbour upsampling of ``x``, without upsampling.

  Args:
    x: ``[B, H, W, Cin]``, any float dtype (the computation dtype).
    kernel: ``[3, 3, Cin, Cout]`` (HWIO), bias: ``[Cout]`` or None. Taps are summed in
      the kernel's dtype (float32 for the model's parameters), then cast to
      ``x``'s.

  Returns:
    ``[B, 2H, 2W, Cout]``, equal (up to float rounding) to
    ``conv3x3(repeat(repeat(x, 2, axis=1), 2, axis=2))``. Each of the four output
    phases (row parity a, column parity b) is a 2x2 conv of ``x`` whose taps are
    sums of the 3x3 taps, so the work is 16 instead of 36 multiply-adds per
    input pixel and channel pair, and the 4x larger upsampled input is never
    built. On a 2-core CPU this made the CIFAR-10 U-Net's 256-channel 16x16 ->
    32x32 upsample conv 1.5x faster forward and 4x faster forward + backward
    (``benchmarks/upsample_conv.py``).
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


def upsample_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """:func:`upsample2x_conv3x3`, or on CPU, where it was measured faster, Winograd's conv of the upsampled ``x``.

  Args and result as :func:`upsample2x_conv3x3`. The two-phase form does 16
  multiply-adds per input pixel and channel pair, Winograd's F(4x4, 3x3) on
  the 4x larger upsampled input 4 x 36 / 16 = 9 but with more memory traffic,
  and which is faster depends on the CPU and the shape (AMD EPYC host,
  forward + gradients: 1.16-1.55x for Winograd at 64 channels; forward alone
  0.87-0.95x). So
  for float32 shapes where Winograd can run (``winograd.applies`` or
  ``worth_measuring`` on the upsampled shape) ``conv_timing`` times both once
  per layer shape (kind ``'upsample2x_conv3x3'``). Layers too large to measure
  in a few seconds (``conv_timing.MEASURE_FLOPS``: the CIFAR-10 U-Net's upsample
  to 32x32, the 256x256 models'), and GPU and TPU programs, get the two-phase form.
  """
  B, H, W, C = x.shape

  def two_phase(x, kernel):
    return upsample2x_conv3x3(x, kernel)

  def winograd_of_upsampled(x, kernel):
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return winograd.conv3x3(up, kernel.astype(x.dtype))

  up = ((B, 2 * H, 2 * W, C), kernel.shape, (1, 1), "SAME", x.dtype)
  if not (conv.CPU_WINOGRAD
          and (winograd.applies(*up) or winograd.worth_measuring(*up))
          and conv_timing.winograd_is_faster(x.shape, kernel.shape[-1], x.dtype, two_phase,
                                             winograd_of_upsampled, kind="upsample2x_conv3x3")):
    return upsample2x_conv3x3(x, kernel, bias)
  y = jax.lax.platform_dependent(x, kernel, cpu=winograd_of_upsampled, default=two_phase)
  return y + bias.astype(x.dtype)


class _UpsampleConv(nn.Module):
  """The 3x3 conv after a 2x nearest upsampling, applied to the input before it.

  Parameters are ``nn.Conv``'s (``kernel [3, 3, C, C]``, ``bias [C]``, same
  initialisers), so checkpoints are the same as for upsample-then-conv.
  """

  dtype: Any = jnp.float32  # computation dtype; params are float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    C = x.shape[-1]
    kernel = self.param("kernel", default_init(), (3, 3, C, C), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (C,), jnp.float32)
    return upsample_conv(x.astype(self.dtype), kernel, bias)


class Upsample(nn.Module):
  """Double H and W by nearest-neighbour repetition, then optionally a 3x3 conv.

  (The paper's ``tf.image.resize(..., NEAREST_NEIGHBOR, align_corners=True)``
  equals plain 2x repetition for an exact factor-2 resize.) With the conv, the
  two are computed together by :func:`upsample_conv`.
  """

  with_conv: bool = True  # follow the resize with a 3x3 conv
  dtype: Any = jnp.float32  # computation dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x ``[B, H, W, C]``. Returns ``[B, 2H, 2W, C]``."""
    x = x.astype(self.dtype)
    if self.with_conv:
      return _UpsampleConv(self.dtype, name="conv")(x)
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class UNet(nn.Module):
  """The DDPM noise-prediction U-Net (see the module docstring for the layout and names).

  Defaults are the paper's CIFAR-10 model (35,746,307 parameters).
  """

  ch: int = 128  # base channel count (must be a positive multiple of 32, the GroupNorm groups)
  ch_mult: tuple = (1, 2, 2, 2)  # per-level channel multipliers; level i has ch*ch_mult[i] channels
  num_res_blocks: int = 2  # ResnetBlocks per level on the down path (up path has one more)
  attn_resolutions: tuple = (16,)  # feature-map heights at which an AttnBlock follows each ResnetBlock
  dropout: float = 0.1  # dropout rate inside ResnetBlocks (only when train=True)
  resamp_with_conv: bool = True  # use convs in Downsample/Upsample (else avg-pool / plain resize)
  out_ch: int = 3  # output channels (3 for eps prediction; 6 to also output variances)
  num_classes: Optional[int] = None  # extension: if set, a learned class embedding (4*ch) is added to temb
  dtype: Any = jnp.float32  # computation dtype (e.g. jnp.bfloat16); params, GroupNorm, softmax and output stay float32
  remat: bool = False  # rematerialise ResnetBlocks in the backward pass (memory switch; same outputs/params)

  def _check_config(self) -> None:
    def bad(msg: str) -> None:
      raise ValueError(msg)

    if not isinstance(self.ch, (int, np.integer)) or self.ch <= 0 or self.ch % GN_GROUPS != 0:
      bad(f"model.ch={self.ch!r} must be a positive multiple of {GN_GROUPS} (the GroupNorm group count)")
    if len(self.ch_mult) == 0 or any(
        not isinstance(m, (int, np.integer)) or m <= 0 for m in self.ch_mult
    ):
      bad(f"model.ch_mult={self.ch_mult!r} must be a non-empty tuple of positive ints")
    if not isinstance(self.num_res_blocks, (int, np.integer)) or self.num_res_blocks < 1:
      bad(f"model.num_res_blocks={self.num_res_blocks!r} must be a positive int")
    if not 0.0 <= float(self.dropout) < 1.0:
      bad(f"model.dropout={self.dropout!r} must be in [0, 1)")
    if not isinstance(self.out_ch, (int, np.integer)) or self.out_ch <= 0:
      bad(f"model.out_ch={self.out_ch!r} must be a positive int")
    if self.num_classes is not None and (
        not isinstance(self.num_classes, (int, np.integer)) or self.num_classes <= 0
    ):
      bad(f"model.num_classes={self.num_classes!r} must be None or a positive int")

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      t: jax.Array,
      y: Optional[jax.Array] = None,
      train: bool = False,
      dropout_keys: Optional[jax.Array] = None,
  ) -> jax.Array:
    """Predict the noise (and optionally variances) for a batch.

    Args:
      x: ``[B, H, W, C]`` float images in ``[-1, 1]`` (NHWC); H and W must be
        divisible by ``2**(len(ch_mult)-1)``.
      t: ``[B]`` int timesteps in ``[0, T)``.
      y: ``[B]`` int class labels in ``[0, num_classes)``; required iff
        ``num_classes`` is set, must be None otherwise.
      train: enables dropout (needs ``rngs={'dropout': key}`` or ``dropout_keys``).
      dropout_keys: ``[B]`` PRNG keys, one per example: each example's dropout
        masks then depend on its key alone, so a batch gives the same outputs as
        its examples run one at a time (the trainer uses this to make training
        independent of how the batch is split over devices).

    Returns:
      ``[B, H, W, out_ch]`` float32.
    """
    self._check_config()
    if x.ndim != 4:
      raise ValueError(f"x must have shape [B, H, W, C] (NHWC), got shape {x.shape}")
    B, H, W, _ = x.shape
    factor = 2 ** (len(self.ch_mult) - 1)
    for size in (H, W):
      if size % factor != 0:
        raise ValueError(
            f"image size {size} is not divisible by 2**(len(ch_mult)-1)={factor} "
            f"(model.ch_mult={tuple(self.ch_mult)}); got x of shape {x.shape}"
        )
    t = jnp.asarray(t)
    if t.shape != (B,):
      raise ValueError(f"t must have shape [B]=({B},), got shape {t.shape}")
    if self.num_classes is None and y is not None:
      raise ValueError("y (class labels) was given but model.num_classes is None")
    if self.num_classes is not None:
      if y is None:
        raise ValueError(f"model.num_classes={self.num_classes} requires class labels y of shape [B]")
      y = jnp.asarray(y)
      if y.shape != (B,):
        raise ValueError(f"y must have shape [B]=({B},), got shape {y.shape}")

    dt = self.dtype
    ch = self.ch
    num_resolutions = len(self.ch_mult)
    block_cls = nn.remat(ResnetBlock, static_argnums=(3,)) if self.remat else ResnetBlock

    def resblock(h, out_ch, name):
      return block_cls(out_ch=out_ch, dropout=self.dropout, dtype=dt, name=name)(
          h, temb, train, dropout_keys)

    # Timestep embedding.
    temb = get_timestep_embedding(t, ch)
    temb = _dense(4 * ch, "temb_dense0", dt)(temb.astype(dt))
    temb = _dense(4 * ch, "temb_dense1", dt)(nn.swish(temb))
    if self.num_classes is not None:
      emb = nn.Embed(
          self.num_classes,
          4 * ch,
          dtype=dt,
          param_dtype=jnp.float32,
          embedding_init=nn.initializers.normal(stddev=1.0),
          name="class_emb",
      )
      temb = temb + emb(y)

    # Downsampling.
    hs = [_conv3x3(ch, "conv_in", dt)(x.astype(dt))]
    for i_level in range(num_resolutions):
      for i_block in range(self.num_res_blocks):
        h = resblock(hs[-1], ch * self.ch_mult[i_level], f"down_{i_level}_block_{i_block}")
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(dtype=dt, name=f"down_{i_level}_attn_{i_block}")(h)
        hs.append(h)
      if i_level != num_resolutions - 1:
        hs.append(
            Downsample(self.resamp_with_conv, dtype=dt, name=f"down_{i_level}_downsample")(hs[-1])
        )

    # Middle.
    h = hs[-1]
    h = resblock(h, h.shape[-1], "mid_block_1")
    h = AttnBlock(dtype=dt, name="mid_attn_1")(h)
    h = resblock(h, h.shape[-1], "mid_block_2")

    # Upsampling.
    for i_level in reversed(range(num_resolutions)):
      for i_block in range(self.num_res_blocks + 1):
        h = resblock(
            jnp.concatenate([h, hs.pop()], axis=-1),
            ch * self.ch_mult[i_level],
            f"up_{i_level}_block_{i_block}",
        )
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(dtype=dt, name=f"up_{i_level}_attn_{i_block}")(h)
      if i_level != 0:
        h = Upsample(self.resamp_with_conv, dtype=dt, name=f"up_{i_level}_upsample")(h)
    assert not hs

    # End.
    h = nn.swish(_group_norm(h, "norm_out", dt))
    h = _conv3x3(self.out_ch, "conv_out", dt, init_scale=0.0)(h)
    return h.astype(jnp.float32)
