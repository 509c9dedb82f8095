"""Classifier-free guidance (Ho & Salimans 2022) as a network wrapper for any sampler.

eps~(x, c) = (1 + w) eps(x, c) - w eps(x, no class). The combination is applied
to the network's output itself, whatever it predicts: eps, x0 and v are affine
in one another for a fixed x_t and t, and the weights (1 + w) and -w sum to 1,
so guiding the output is guiding eps. A learned variance is the conditional
branch's. Both branches are one batched network call.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ddpm_jax.diffusion.gaussian import ModelFn

# (x_t [B, H, W, C], t [B], labels [B] int) -> output [B, H, W, C or 2C]
LabelledModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def guided_model_fn(
    model_fn: LabelledModelFn,
    labels: jax.Array,
    null_label: int,
    scale: float,
    learned_variance: bool = False,
) -> ModelFn:
  """The sampler's model_fn(x_t, t) for ``labels`` [B] with guidance scale ``scale`` = w >= 0.

  With w = 0 it is the plain conditional network (one call of batch B);
  otherwise one call of batch 2B: [x_t; x_t] with [labels; null_label].
  """
  if scale == 0:
    return lambda x, t: model_fn(x, t, labels)

  def fn(x, t):
    b = x.shape[0]
    both = model_fn(
        jnp.concatenate([x, x]),
        jnp.concatenate([t, t]),
        jnp.concatenate([labels, jnp.full((b,), null_label, labels.dtype)]),
    )
    cond, uncond = both[:b], both[b:]
    if not learned_variance:
      return (1.0 + scale) * cond - scale * uncond
    (mean_c, var_c), (mean_u, _) = jnp.split(cond, 2, -1), jnp.split(uncond, 2, -1)
    return jnp.concatenate([(1.0 + scale) * mean_c - scale * mean_u, var_c], axis=-1)

  return fn
