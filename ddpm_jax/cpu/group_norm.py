"""GroupNorm arranged for XLA:CPU: the same two-pass statistics as Flax's, reduced over space.

Flax's ``GroupNorm`` reshapes ``[B, H, W, C]`` to ``[B, H, W, G, C/G]`` and
reduces over (H, W, C/G). Here both reductions (the mean, then the mean of the
squared deviations) run over the spatial axes with the channels as the
vectorised minor axis, and the step from channels to groups is a tiny
``[B, C]`` reshape. The result equals ``flax.linen.GroupNorm(use_fast_variance=
False)``'s up to float rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, eps: float
) -> jax.Array:
  """GroupNorm of ``x`` over its spatial axes and each group of channels.

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
