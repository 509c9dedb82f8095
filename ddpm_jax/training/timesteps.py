"""Importance-sampled timesteps (Nichol & Dhariwal 2021, Sec. 3.3): ``training.t_sampler='loss_aware'``.

Each timestep t keeps its last ``HISTORY`` training losses. Once every t has a
full history, t is drawn with probability proportional to sqrt(E[L_t^2]) over
that history, mixed with a uniform floor ``UNIFORM_FLOOR``; until then t is
uniform. The loss of an example is weighted by 1 / (T p_t), so the weighted loss
is an unbiased estimate of the uniform-t loss. The history is part of the train
state (checkpointed); every device updates it with the same losses of the whole
global batch, in the order of the global batch, so it does not depend on how
the batch is split over devices.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

HISTORY = 10
UNIFORM_FLOOR = 1e-3


def init(num_timesteps: int) -> dict:
  """An empty history: {'losses': float32 [T, HISTORY], 'count': int32 [T]}."""
  return dict(
      losses=jnp.zeros((num_timesteps, HISTORY), jnp.float32),
      count=jnp.zeros((num_timesteps,), jnp.int32),
  )


def probabilities(history: dict) -> jax.Array:
  """p_t, float32 [T]: uniform until every t has HISTORY losses, then sqrt(E[L^2]) plus the floor."""
  T = history["count"].shape[0]
  weights = jnp.sqrt(jnp.mean(jnp.square(history["losses"]), axis=-1))
  p = weights / jnp.sum(weights)
  p = p * (1.0 - UNIFORM_FLOOR) + UNIFORM_FLOOR / T
  warm = jnp.all(history["count"] == HISTORY)
  return jnp.where(warm, p, jnp.full((T,), 1.0 / T, jnp.float32))


def draw(key: jax.Array, p: jax.Array) -> jax.Array:
  """One t (int32 scalar) with probability p [T]."""
  return jax.random.categorical(key, jnp.log(p)).astype(jnp.int32)


def update(history: dict, t: jax.Array, losses: jax.Array) -> dict:
  """The history after the losses [N] of timesteps t [N] (int), taken in order.

  A t whose history is full drops its oldest loss. One ``lax.scan`` over the N
  examples, so the result is the same as adding them one at a time.
  """

  def add(h: dict, tl: Any):
    ti, li = tl
    row, n = h["losses"][ti], h["count"][ti]
    full = n == HISTORY
    row = jnp.where(
        full, jnp.roll(row, -1).at[-1].set(li), row.at[jnp.minimum(n, HISTORY - 1)].set(li)
    )
    return (
        dict(
            losses=h["losses"].at[ti].set(row),
            count=h["count"].at[ti].set(jnp.minimum(n + 1, HISTORY)),
        ),
        None,
    )

  history, _ = jax.lax.scan(add, history, (t.astype(jnp.int32), losses.astype(jnp.float32)))
  return history
