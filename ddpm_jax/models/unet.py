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

from ddpm_jax.cpu import conv as cpu_conv
from ddpm_jax.cpu import dropout as cpu_dropout
from ddpm_jax.cpu import upsample as cpu_upsample

__all__ = [
    "UNet",
    "ResnetBlock",
    "AttnBlock",
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


def group_norm_channels_minor(
    x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, eps: float
) -> jax.Array:
  """GroupNorm of ``x`` over its spatial axes and each group of channels, the channels kept minor.

  ``flax.linen.GroupNorm`` reshapes ``[B, H, W, C]`` to ``[B, H, W, G, C/G]``
  and reduces over (H, W, C/G). Here both reductions (the mean, then the mean
  of the squared deviations) run over the spatial axes with the channels as
  the minor axis, and the step from channels to groups is a tiny ``[B, C]``
  reshape: equal to Flax's (``use_fast_variance=False``) up to float rounding.
  XLA:CPU vectorises it better, and in a bfloat16 TPU program it keeps XLA
  from laying activations out with C/G (8 or 16) as the 128-lane minor axis.

  Args:
    x: ``[B, ..., C]`` float32, ``C`` divisible by ``num_groups``.
    scale, bias: ``[C]`` float32 (TF's ``gamma`` and ``beta``).
    num_groups, eps: groups and the epsilon added to the variance.

  Returns:
    ``[B, ..., C]``: ``(x - mean) / sqrt(var + eps) * scale + bias``, with the
    mean and the two-pass variance E[(x - mean)^2] of each (example, group).
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


class _ChannelsMinorGroupNorm(nn.Module):
  """``group_norm_channels_minor`` with ``flax.linen.GroupNorm``'s parameters (``scale``, ``bias``)."""

  num_groups: int = GN_GROUPS
  epsilon: float = GN_EPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    C = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (C,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (C,), jnp.float32)
    return group_norm_channels_minor(x, scale, bias, self.num_groups, self.epsilon)


def _group_norm(x: jax.Array, name: str, dtype: Any, cpu_kernels: bool) -> jax.Array:
  """The paper's GroupNorm (32 groups, eps 1e-6, two-pass variance) in float32, cast to ``dtype``.

  A float32 model on GPU/TPU uses ``flax.linen.GroupNorm``; a CPU program
  (``cpu_kernels``) and every bfloat16 model ``group_norm_channels_minor``,
  the same statistics reduced per channel first (docs/tpu.md: a bfloat16 TPU
  program is cheaper with it, a float32 one is not).

  Args: x: [B, H, W, C] with C divisible by 32. Returns [B, H, W, C] in ``dtype``.
  """
  if x.shape[-1] % GN_GROUPS:
    raise ValueError(f"GroupNorm: {x.shape[-1]} channels are not divisible by {GN_GROUPS} groups")
  x = x.astype(jnp.float32)
  if cpu_kernels or jnp.dtype(dtype) != jnp.float32:
    return _ChannelsMinorGroupNorm(name=name)(x).astype(dtype)
  norm = nn.GroupNorm(
      num_groups=GN_GROUPS,
      epsilon=GN_EPS,
      use_fast_variance=False,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      name=name,
  )
  return norm(x).astype(dtype)


class _CPUConv3x3(nn.Module):
  """``ddpm_jax.cpu.conv.conv3x3`` with ``nn.Conv``'s parameters (``kernel [3, 3, Cin, Cout]``, ``bias``)."""

  features: int
  strides: int = 1
  init_scale: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
        "kernel", default_init(self.init_scale), (3, 3, x.shape[-1], self.features), jnp.float32
    )
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    y = cpu_conv.conv3x3(
        x.astype(self.dtype), kernel.astype(self.dtype), (self.strides, self.strides), "SAME"
    )
    return y + bias.astype(self.dtype)


def _conv3x3(
    x: jax.Array,
    features: int,
    name: str,
    dtype: Any,
    cpu_kernels: bool,
    init_scale: float = 1.0,
    strides: int = 1,
) -> jax.Array:
  """3x3 conv with TF 'SAME' padding (the paper's ``nn.conv2d``).

  Args: x: [B, H, W, Cin]. Returns [B, H / strides, W / strides, features] in ``dtype``.
  """
  if cpu_kernels:
    return _CPUConv3x3(features, strides, init_scale, dtype, name=name)(x)
  conv = nn.Conv(
      features,
      (3, 3),
      strides=(strides, strides),
      padding="SAME",
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=default_init(init_scale),
      bias_init=nn.initializers.zeros,
      name=name,
  )
  return conv(x.astype(dtype))


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


def _dropout(
    h: jax.Array, rate: float, train: bool, keys: Optional[jax.Array], name: str, cpu_kernels: bool
) -> jax.Array:
  """Dropout from the 'dropout' rng stream, or from one key per example.

  Args: h: [B, ...]; keys: optional [B] PRNG keys. With ``keys``, example b's
  mask depends only on keys[b] and the block's name, not on the batch it sits in.
  """
  if not train or rate == 0.0:
    return h
  if keys is None:
    return nn.Dropout(rate=rate, deterministic=False)(h)
  salt = zlib.crc32(name.encode()) & 0x7FFFFFFF
  block_keys = jax.vmap(lambda k: jax.random.fold_in(k, salt))(keys)
  shape = h.shape[1:]
  if cpu_kernels:
    keep = cpu_dropout.keep_mask(block_keys, 1.0 - rate, shape)
  else:
    keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, shape))(block_keys)
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
  cpu_kernels: bool = False  # ddpm_jax.cpu's convs, GroupNorm and dropout masks

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      temb: jax.Array,
      train: bool = False,
      dropout_keys: Optional[jax.Array] = None,
  ) -> jax.Array:
    """Args: x ``[B, H, W, C]``; temb ``[B, E]``; train: enables dropout;
    dropout_keys: optional ``[B]`` PRNG keys, one per example (see ``UNet``).

    Returns ``[B, H, W, out_ch]`` in ``dtype``.
    """
    in_ch = x.shape[-1]
    dt, cpu = self.dtype, self.cpu_kernels
    x = x.astype(dt)
    h = nn.swish(_group_norm(x, "norm1", dt, cpu))
    h = _conv3x3(h, self.out_ch, "conv1", dt, cpu)
    h = h + _dense(self.out_ch, "temb_proj", dt)(nn.swish(temb.astype(dt)))[:, None, None, :]
    h = nn.swish(_group_norm(h, "norm2", dt, cpu))
    h = _dropout(h, self.dropout, train, dropout_keys, self.name, cpu)
    h = _conv3x3(h, self.out_ch, "conv2", dt, cpu, init_scale=0.0)
    if in_ch != self.out_ch:
      # Over [B*H*W, C] rows, as in AttnBlock, for a plain weight-gradient dot.
      x = _dense(self.out_ch, "nin_shortcut", dt)(x.reshape(-1, in_ch)).reshape(h.shape)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions (the paper's ``attn_block``)."""

  dtype: Any = jnp.float32  # computation dtype; the softmax is always float32
  cpu_kernels: bool = False  # ddpm_jax.cpu's GroupNorm

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x ``[B, H, W, C]``. Returns ``x + proj_out(attention)``, ``[B, H, W, C]``."""
    B, H, W, C = x.shape
    x = x.astype(self.dtype)
    # The projections see [B*H*W, C] rows, so their weight gradients are plain dots.
    h = _group_norm(x, "norm", self.dtype, self.cpu_kernels).reshape(B * H * W, C)
    # 1/sqrt(C) scales q ([B, HW, C]) rather than the logits ([B, HW, HW]): the same product.
    q = (_dense(C, "q", self.dtype)(h) * (C**-0.5)).reshape(B, H * W, C)
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
  cpu_kernels: bool = False  # ddpm_jax.cpu's conv

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x ``[B, H, W, C]`` with even H, W. Returns ``[B, H/2, W/2, C]``."""
    x = x.astype(self.dtype)
    if self.with_conv:
      return _conv3x3(x, x.shape[-1], "conv", self.dtype, self.cpu_kernels, strides=2)
    return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding="SAME")


class _CPUUpsampleConv(nn.Module):
  """``ddpm_jax.cpu.upsample`` with ``nn.Conv``'s parameters: the 3x3 conv of the upsampled input."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    C = x.shape[-1]
    kernel = self.param("kernel", default_init(), (3, 3, C, C), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (C,), jnp.float32)
    return cpu_upsample.upsample2x_conv3x3(x.astype(self.dtype), kernel, bias)


class Upsample(nn.Module):
  """Double H and W by nearest-neighbour repetition, then optionally a 3x3 conv.

  (The paper's ``tf.image.resize(..., NEAREST_NEIGHBOR, align_corners=True)``
  equals plain 2x repetition for an exact factor-2 resize.)
  """

  with_conv: bool = True  # follow the resize with a 3x3 conv
  dtype: Any = jnp.float32  # computation dtype
  cpu_kernels: bool = False  # ddpm_jax.cpu's upsample conv (the same parameters)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x ``[B, H, W, C]``. Returns ``[B, 2H, 2W, C]``."""
    x = x.astype(self.dtype)
    if self.with_conv and self.cpu_kernels:
      return _CPUUpsampleConv(self.dtype, name="conv")(x)
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if self.with_conv:
      return _conv3x3(x, x.shape[-1], "conv", self.dtype, cpu_kernels=False)
    return x


class UNet(nn.Module):
  """The DDPM noise-prediction U-Net (see the module docstring for the layout and names).

  Defaults are the paper's CIFAR-10 model (35,746,307 parameters).
  """

  ch: int = 128  # base channel count (must be a positive multiple of 32, the GroupNorm groups)
  ch_mult: tuple = (1, 2, 2, 2)  # per-level channel multipliers; level i has ch*ch_mult[i] channels
  num_res_blocks: int = 2  # ResnetBlocks per level on the down path (up path has one more)
  attn_resolutions: tuple = (
      16,
  )  # feature-map heights at which an AttnBlock follows each ResnetBlock
  dropout: float = 0.1  # dropout rate inside ResnetBlocks (only when train=True)
  resamp_with_conv: bool = True  # use convs in Downsample/Upsample (else avg-pool / plain resize)
  out_ch: int = 3  # output channels (3 for eps prediction; 6 to also output variances)
  num_classes: Optional[int] = (
      None  # extension: if set, a learned class embedding (4*ch) is added to temb
  )
  dtype: Any = (
      jnp.float32
  )  # computation dtype (e.g. jnp.bfloat16); params, GroupNorm, softmax and output stay float32
  remat: bool = (
      False  # rematerialise ResnetBlocks in the backward pass (memory switch; same outputs/params)
  )
  cpu_kernels: bool = (
      False  # ddpm_jax.cpu's kernels (XLA:CPU only; same parameters, float rounding aside)
  )

  def _check_config(self) -> None:
    def bad(msg: str) -> None:
      raise ValueError(msg)

    if not isinstance(self.ch, (int, np.integer)) or self.ch <= 0 or self.ch % GN_GROUPS != 0:
      bad(
          f"model.ch={self.ch!r} must be a positive multiple of {GN_GROUPS} (the GroupNorm group count)"
      )
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
        raise ValueError(
            f"model.num_classes={self.num_classes} requires class labels y of shape [B]"
        )
      y = jnp.asarray(y)
      if y.shape != (B,):
        raise ValueError(f"y must have shape [B]=({B},), got shape {y.shape}")

    dt, cpu = self.dtype, self.cpu_kernels
    ch = self.ch
    num_resolutions = len(self.ch_mult)
    block_cls = nn.remat(ResnetBlock, static_argnums=(3,)) if self.remat else ResnetBlock

    def resblock(h, out_ch, name):
      return block_cls(out_ch=out_ch, dropout=self.dropout, dtype=dt, cpu_kernels=cpu, name=name)(
          h, temb, train, dropout_keys
      )

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
    hs = [_conv3x3(x, ch, "conv_in", dt, cpu)]
    for i_level in range(num_resolutions):
      for i_block in range(self.num_res_blocks):
        h = resblock(hs[-1], ch * self.ch_mult[i_level], f"down_{i_level}_block_{i_block}")
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(dtype=dt, cpu_kernels=cpu, name=f"down_{i_level}_attn_{i_block}")(h)
        hs.append(h)
      if i_level != num_resolutions - 1:
        hs.append(
            Downsample(
                self.resamp_with_conv, dtype=dt, cpu_kernels=cpu, name=f"down_{i_level}_downsample"
            )(hs[-1])
        )

    # Middle.
    h = hs[-1]
    h = resblock(h, h.shape[-1], "mid_block_1")
    h = AttnBlock(dtype=dt, cpu_kernels=cpu, name="mid_attn_1")(h)
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
          h = AttnBlock(dtype=dt, cpu_kernels=cpu, name=f"up_{i_level}_attn_{i_block}")(h)
      if i_level != 0:
        h = Upsample(
            self.resamp_with_conv, dtype=dt, cpu_kernels=cpu, name=f"up_{i_level}_upsample"
        )(h)
    assert not hs

    # End.
    h = nn.swish(_group_norm(h, "norm_out", dt, cpu))
    h = _conv3x3(h, self.out_ch, "conv_out", dt, cpu, init_scale=0.0)
    return h.astype(jnp.float32)
