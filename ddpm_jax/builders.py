"""What every program builds from a config: the model, the processes, the optimizer, EMA weights.

Training, sampling, evaluation, the converter and the compile check all start
here: the U-Net of ``config.model`` (with the CPU kernels only in a program
built for a CPU), the diffusion of ``config.diffusion`` (the full process, or
the respaced one the sampler walks), the network as the diffusion core calls
it, Adam with warm-up and clipping, and the EMA parameters of a trained
workdir.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpm_jax import checkpoints, errors
from ddpm_jax.cpu import cpu_kernels_active
from ddpm_jax.diffusion import schedules
from ddpm_jax.diffusion.gaussian import GaussianDiffusion, respaced
from ddpm_jax.models.unet import UNet


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


def ema_params(config, workdir: str) -> tuple[UNet, dict, int]:
  """(model, EMA params on the host, step) of checkpoint ``sampling.checkpoint_step`` (-1: newest).

  What sampling and evaluation start from. Raises NoCheckpointError when the
  workdir holds no (such) checkpoint, CheckpointMismatchError for another
  architecture, CorruptCheckpointError when none is readable.
  """
  model = build_model(config)
  directory = checkpoints.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise errors.NoCheckpointError(
        f"no checkpoints in {directory}: train first (--mode=train) "
        "or point --workdir at a trained run"
    )
  params, step = checkpoints.restore_ema_params(
      checkpoints.create_manager(workdir, read_only=True),
      abstract_params(model, config),
      config,
      step=config.sampling.checkpoint_step,
  )
  return model, params, int(step)
