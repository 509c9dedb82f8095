"""What every program builds from a config: the model, the processes, the optimizer, the state.

Shared by training, sampling and evaluation: the U-Net of ``config.model``, the
diffusion of ``config.diffusion`` (the full process, or the respaced one the
sampler walks), Adam with warm-up and clipping, the ``TrainState`` saved in
checkpoints (its replication over the local devices is ``parallel.py``'s).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpm_jax.diffusion import schedules
from ddpm_jax.diffusion.gaussian import GaussianDiffusion, respaced
from ddpm_jax.models.unet import UNet

# Re-exported: programs (and code written against earlier versions) import them from here.
from ddpm_jax.parallel import AXIS, device_sharding, replicate, unreplicate  # pylint: disable=unused-import
from ddpm_jax.training import timesteps


@flax.struct.dataclass
class TrainState:
  """Everything that determines the rest of a run (saved in every checkpoint).

  step: int32 scalar, optimiser steps taken.
  params: the network parameters (float32).
  ema_params: their exponential moving average (used for sampling).
  opt_state: the optax state (Adam moments, step counts).
  rng: the run's base PRNG key; step and example index are folded into it.
  t_history: the recent losses per timestep of ``training.t_sampler='loss_aware'``
    (``training/timesteps.py``), else None.
  """

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
  t_history: Any = None


def cpu_kernels_active(config: ml_collections.ConfigDict, platform: Optional[str] = None) -> bool:
  """Whether a program built for ``platform`` uses the CPU kernels (``ddpm_jax/cpu``).

  True when ``config.model.cpu_kernels`` is on (the default) and ``platform`` is
  'cpu'; a program for 'gpu' or 'tpu' is the plain model whatever the config
  says. ``platform``: the platform the program is compiled for (default: JAX's
  default backend; a program compiled ahead of time for another one passes it).
  """
  return bool(config.model.cpu_kernels) and (platform or jax.default_backend()) == "cpu"


def auto_choice(
    choice: str, config, platform: Optional[str], with_cpu_kernels: str, otherwise: str
) -> str:
  """``choice``, with 'auto' resolved: ``with_cpu_kernels`` when they are active, else ``otherwise``."""
  if choice != "auto":
    return choice
  return with_cpu_kernels if cpu_kernels_active(config, platform) else otherwise


def get_betas(config: ml_collections.ConfigDict) -> np.ndarray:
  """The float64 schedule beta_1..beta_T of ``config.diffusion``: [T]."""
  d = config.diffusion
  return schedules.get_beta_schedule(d.beta_schedule, d.num_timesteps, d.beta_start, d.beta_end)


def _diffusion_kwargs(config):
  d = config.diffusion
  return dict(
      model_mean_type=d.model_mean_type, model_var_type=d.model_var_type, loss_type=d.loss_type
  )


def build_diffusion(config: ml_collections.ConfigDict) -> GaussianDiffusion:
  """The training process (all T steps)."""
  return GaussianDiffusion(get_betas(config), **_diffusion_kwargs(config))


DPM_SOLVER_DEFAULT_STEPS = 20
# The samplers that pick their own times on the full process (DPM-Solver++, ODE and SDE).
DPM_SOLVERS = ("dpm_solver++", "dpm_solver++_sde")


def sampling_steps(config: ml_collections.ConfigDict) -> int:
  """Network calls of one sample: ``sampling.num_steps``, or its default (T; DPM-Solver++: 20)."""
  s = config.sampling
  if s.num_steps:
    return int(s.num_steps)
  return DPM_SOLVER_DEFAULT_STEPS if s.sampler in DPM_SOLVERS else config.diffusion.num_timesteps


def build_sampling_diffusion(config: ml_collections.ConfigDict) -> GaussianDiffusion:
  """The process the sampler walks: all T steps, or the respaced subset of ``sampling.num_steps``.

  DPM-Solver++ (ODE and SDE) always gets the full process (it picks its own times).
  """
  betas = get_betas(config)
  s = config.sampling
  if s.sampler in DPM_SOLVERS or not s.num_steps or s.num_steps == len(betas):
    return GaussianDiffusion(betas, **_diffusion_kwargs(config))
  spec = f"ddim{s.num_steps}" if s.sampler == "ddim" else str(s.num_steps)
  return respaced(betas, schedules.space_timesteps(len(betas), spec), **_diffusion_kwargs(config))


def build_model(config: ml_collections.ConfigDict, platform: Optional[str] = None) -> UNet:
  """The U-Net of ``config.model``; 2x channels out when the variance is learned.

  ``platform`` (default: JAX's backend) decides whether ``model.cpu_kernels`` applies.
  """
  m = config.model
  learned = config.diffusion.model_var_type in ("learned", "learned_range")
  return UNet(
      ch=m.ch,
      ch_mult=tuple(m.ch_mult),
      num_res_blocks=m.num_res_blocks,
      attn_resolutions=tuple(m.attn_resolutions),
      dropout=m.dropout,
      resamp_with_conv=m.resamp_with_conv,
      out_ch=config.data.channels * (2 if learned else 1),
      # K classes and one more embedding, index K: "no class" (classifier-free guidance).
      num_classes=m.num_classes + 1 if m.num_classes else None,
      dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[m.dtype],
      remat=m.remat,
      cpu_kernels=cpu_kernels_active(config, platform),
  )


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> Callable[[Any], Any]:
  """lr * min(step / warmup, 1), as the paper's code (0 at the first step).

  With ``optim.decay_steps`` N > 0 the rate after warm-up follows a half cosine
  from lr down to 0 at step N (and stays 0 after it): short runs end on a small
  step, which their EMA would otherwise have to average out.
  """

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    lr = jnp.asarray(optim.lr, jnp.float32)
    if optim.warmup_steps > 0:
      lr = lr * jnp.minimum(count / optim.warmup_steps, 1.0)
    if optim.decay_steps > 0:
      span = max(optim.decay_steps - optim.warmup_steps, 1)
      done = jnp.clip((count - optim.warmup_steps) / span, 0.0, 1.0)
      lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * done))
    return lr

  return schedule


def create_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with linear warm-up and global-norm clipping (paper: 2e-4, 5000, 1.0)."""
  parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
  parts += [
      optax.scale_by_adam(b1=optim.beta1, b2=optim.beta2, eps=optim.eps),
      optax.scale_by_learning_rate(learning_rate_schedule(optim)),
  ]
  return optax.chain(*parts)


def image_shape(config) -> tuple[int, int, int]:
  """(H, W, C) of one image of ``config.data``."""
  return (config.data.image_size, config.data.image_size, config.data.channels)


def init_params(model: UNet, config, rng: jax.Array):
  """Parameters of ``model`` for ``config``'s image shape (float32)."""
  x = jnp.zeros((1,) + image_shape(config), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  y = jnp.zeros((1,), jnp.int32) if config.model.num_classes else None
  return model.init({"params": rng}, x, t, y, train=False)["params"]


def abstract_params(model: UNet, config):
  """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (nothing computed)."""
  return jax.eval_shape(functools.partial(init_params, model, config), jax.random.PRNGKey(0))


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


def make_model_fn(model: UNet, params, train: bool = False, dropout_keys=None, labels=None):
  """model_fn(x_t [B, H, W, C], t [B]) -> output, the network as the diffusion core sees it.

  ``labels``: [B] int class labels of a conditional model. At train time each
  example's dropout masks come from its own key (``dropout_keys`` [B]), not
  from its place in a batch.
  """
  if not (train and model.dropout > 0):
    return lambda x, t: model.apply({"params": params}, x, t, labels, train=False)
  return lambda x, t: model.apply(
      {"params": params}, x, t, labels, train=True, dropout_keys=dropout_keys
  )
