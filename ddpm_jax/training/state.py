"""A fresh ``TrainState``: what a run starts from when its workdir holds no checkpoint.

(The model, the processes and the optimizer are ``ddpm_jax.builders``'; the
state's fields and its checkpoints ``ddpm_jax.checkpoints``'; its replication
over the local devices ``ddpm_jax.parallel``'s.)
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import optax

from ddpm_jax.builders import init_params
from ddpm_jax.checkpoints import TrainState
from ddpm_jax.models.unet import UNet
from ddpm_jax.training import timesteps


def create_train_state(config, model: UNet, tx: optax.GradientTransformation) -> TrainState:
  """A fresh state on the host: params from ``training.seed``, EMA = params."""
  rng = jax.random.PRNGKey(config.training.seed)
  init_rng, run_rng = jax.random.split(rng)
  params = jax.jit(functools.partial(init_params, model, config))(init_rng)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=jax.tree.map(jnp.copy, params),
      opt_state=tx.init(params),
      rng=run_rng,
      t_history=(
          timesteps.init(config.diffusion.num_timesteps)
          if config.training.t_sampler == "loss_aware"
          else None
      ),
  )
