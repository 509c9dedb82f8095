"""The one start-up check of a config: every problem is one line naming the field.

Every field any code reads is defined (and commented) in ``config_schema.py``;
a config with a field that is not there, or without one that is, is refused.
"""

from __future__ import annotations

import os

import ml_collections

from ddpm_jax import config_schema, errors
from ddpm_jax.data.sources import DATASETS, IMAGE_EXTENSIONS
from ddpm_jax.diffusion import schedules
from ddpm_jax.diffusion.gaussian import LOSS_TYPES, MEAN_TYPES, VAR_TYPES

ConfigError = errors.ConfigError
# The samplers that use sampling.timestep_spacing and sampling.thresholding.
SPACED_SAMPLERS = ("dpm_solver++", "dpm_solver++_sde")


def _require(cond: bool, field: str, value, allowed: str) -> None:
  if not cond:
    raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}")


def _int(config, field: str, minimum: int = 0) -> None:
  section, name = field.split(".")
  v = config[section][name]
  _require(
      isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
      field,
      v,
      f"must be an integer >= {minimum}",
  )


def _number(config, field: str, low: float, high: float, closed_low=True, closed_high=True):
  section, name = field.split(".")
  v = config[section][name]
  ok = isinstance(v, (int, float)) and not isinstance(v, bool)
  if ok:
    ok = (v >= low if closed_low else v > low) and (v <= high if closed_high else v < high)
  lo, hi = ("[" if closed_low else "("), ("]" if closed_high else ")")
  _require(ok, field, v, f"must be a number in {lo}{low}, {high}{hi}")


def _choice(config, field: str, allowed) -> None:
  section, name = field.split(".")
  v = config[section][name]
  _require(v in allowed, field, v, f"must be one of {tuple(allowed)}")


def _has_image_file(folder: str) -> bool:
  """Whether any file under ``folder`` has an image extension (stops at the first)."""
  for _, _, names in os.walk(folder):
    if any(n.lower().endswith(IMAGE_EXTENSIONS) for n in names):
      return True
  return False


def _bool(config, field: str) -> None:
  section, name = field.split(".")
  v = config[section][name]
  _require(isinstance(v, bool), field, v, "must be True or False")


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> set:
  out = set()
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out |= _leaves(value, f"{prefix}{key}.")
    else:
      out.add(prefix + key)
  return out


def check_fields(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError unless the config has exactly the fields of ``config_schema.py``."""
  want, have = _leaves(config_schema.get_config()), _leaves(config)
  for field in sorted(have - want):
    raise ConfigError(
        f"config.{field} is not a known field (ddpm_jax/config_schema.py lists them all)"
    )
  for field in sorted(want - have):
    raise ConfigError(
        f"config.{field} is missing (ddpm_jax/config_schema.py lists every field; "
        "start the config from its get_config(), or configs/default.py's)"
    )


# The batch sizes split over the devices: (field, True when over all processes' devices).
BATCH_FIELDS = (
    ("training.batch_size", True),
    ("sampling.batch_size", False),
    ("eval.batch_size", False),
)


def _positive_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def devices_that_fit(config: ml_collections.ConfigDict, most: int, num_processes: int = 1) -> int:
  """The largest device count per process d <= ``most`` that splits every batch of ``config``.

  training.batch_size over num_processes * d devices (and each device's share
  into training.grad_accum_steps), sampling.batch_size and eval.batch_size over
  d. Fields that are not positive integers are left to ``validate``.
  """
  t = config.training
  for d in range(max(int(most), 1), 1, -1):
    ok = True
    for field, is_global in BATCH_FIELDS:
      section, name = field.split(".")
      v = config[section][name]
      n = d * num_processes if is_global else d
      ok = ok and (not _positive_int(v) or v % n == 0)
    if ok and _positive_int(t.batch_size) and _positive_int(t.grad_accum_steps):
      ok = (t.batch_size // (d * num_processes)) % t.grad_accum_steps == 0
    if ok:
      return d
  return 1


def _check_batches_split(config, num_devices: int, num_local_devices: int, hint: str) -> None:
  """One ConfigError naming every batch size the devices do not divide (and ``hint``)."""
  bad = []
  for field, is_global in BATCH_FIELDS:
    _int(config, field, 1)
    section, name = field.split(".")
    n = num_devices if is_global else num_local_devices
    if config[section][name] % n:
      local = not is_global and num_local_devices != num_devices
      bad.append((field, config[section][name], "local " if local else "", n))
  if not bad:
    return
  names = [f"config.{field}={v}" for field, v, _, _ in bad]
  if len({(kind, n) for _, _, kind, n in bad}) == 1:
    _, _, kind, n = bad[0]
    what = f"divisible by the number of {kind}devices ({n})"
  else:
    what = "divisible by the number of " + ", ".join(
        f"{kind}devices ({n}) for {field}" for field, _, kind, n in bad
    )
  if len(bad) == 1:
    message = f"{names[0]} is invalid: must be {what}"
  else:
    message = f"{', '.join(names[:-1])} and {names[-1]} are invalid: each must be {what}"
  raise ConfigError(message + (f"; {hint}" if hint else ""))


def validate(
    config: ml_collections.ConfigDict,
    num_devices: int = 1,
    num_local_devices: int | None = None,
    device_hint: str = "",
) -> None:
  """Raises ConfigError on the first invalid field.

  Args:
    config: the experiment config.
    num_devices: global device count (the batch is split over them).
    num_local_devices: devices of this process (the sampling batch is split over them).
    device_hint: how to change the device count (``host.device_hint``), added to
      the error when the devices do not divide the batch sizes.
  """
  num_local_devices = num_local_devices or num_devices
  check_fields(config)
  # data
  _choice(config, "data.dataset", DATASETS)
  _int(config, "data.image_size", 1)
  _choice(config, "data.channels", (1, 3))
  if config.data.dataset == "digits":
    _require(
        config.data.channels == 1, "data.channels", config.data.channels, "digits are grayscale: 1"
    )
  elif config.data.dataset != "folder":
    _require(
        config.data.channels == 3,
        "data.channels",
        config.data.channels,
        f"{config.data.dataset} is RGB: 3",
    )
  if config.data.dataset == "folder":
    _require(
        bool(config.data.folder) and os.path.isdir(config.data.folder),
        "data.folder",
        config.data.folder,
        "must name an existing directory of images for dataset='folder'",
    )
    _require(
        _has_image_file(config.data.folder),
        "data.folder",
        config.data.folder,
        f"holds no image file ({', '.join(IMAGE_EXTENSIONS)}) in it or its subdirectories",
    )
  _int(config, "data.shuffle_seed", 0)
  _int(config, "data.shuffle_buffer_size", 1)
  _bool(config, "data.random_flip")
  _bool(config, "data.in_memory")
  _require(
      config.data.in_memory or config.data.dataset not in ("digits", "folder"),
      "data.in_memory",
      False,
      f"streaming needs a TFDS data set, not data.dataset=" f"{config.data.dataset!r}",
  )

  # model
  m = config.model
  _int(config, "model.ch", 1)
  _require(m.ch % 32 == 0, "model.ch", m.ch, "must be a multiple of 32 (GroupNorm uses 32 groups)")
  _require(
      isinstance(m.ch_mult, (tuple, list))
      and len(m.ch_mult) >= 1
      and all(isinstance(c, int) and c >= 1 for c in m.ch_mult),
      "model.ch_mult",
      m.ch_mult,
      "must be a non-empty tuple of positive integers",
  )
  _int(config, "model.num_res_blocks", 1)
  factor = 2 ** (len(m.ch_mult) - 1)
  _require(
      config.data.image_size % factor == 0,
      "data.image_size",
      config.data.image_size,
      f"must be divisible by 2**(len(model.ch_mult)-1) = {factor} (model.ch_mult={tuple(m.ch_mult)})",
  )
  resolutions = {config.data.image_size // 2**i for i in range(len(m.ch_mult))}
  _require(
      isinstance(m.attn_resolutions, (tuple, list))
      and all(r in resolutions for r in m.attn_resolutions),
      "model.attn_resolutions",
      m.attn_resolutions,
      f"each must be one of the U-Net's resolutions {sorted(resolutions)}",
  )
  _number(config, "model.dropout", 0.0, 1.0, closed_high=False)
  _int(config, "model.num_classes", 0)
  _choice(config, "model.dtype", ("float32", "bfloat16"))
  for field in ("model.resamp_with_conv", "model.remat"):
    _bool(config, field)
  _require(
      isinstance(m.cpu_kernels, bool),
      "model.cpu_kernels",
      m.cpu_kernels,
      "must be True (the CPU kernels in programs for a CPU, the plain model for GPU/TPU) or "
      "False (the plain model everywhere)",
  )

  # diffusion
  _int(config, "diffusion.num_timesteps", 1)
  _choice(config, "diffusion.beta_schedule", schedules.SCHEDULES)
  _number(config, "diffusion.beta_start", 0.0, 1.0, closed_low=False, closed_high=False)
  _number(config, "diffusion.beta_end", 0.0, 1.0, closed_low=False, closed_high=False)
  _require(
      config.diffusion.beta_start <= config.diffusion.beta_end,
      "diffusion.beta_start",
      config.diffusion.beta_start,
      f"must not exceed diffusion.beta_end={config.diffusion.beta_end}",
  )
  _choice(config, "diffusion.model_mean_type", MEAN_TYPES)
  _choice(config, "diffusion.model_var_type", VAR_TYPES)
  _choice(config, "diffusion.loss_type", LOSS_TYPES)
  learned = config.diffusion.model_var_type in ("learned", "learned_range")
  if learned:
    _require(
        config.diffusion.loss_type != "mse",
        "diffusion.loss_type",
        "mse",
        "trains no variance; use 'hybrid' or 'kl' with a learned model_var_type",
    )
  else:
    _require(
        config.diffusion.loss_type != "hybrid",
        "diffusion.loss_type",
        "hybrid",
        "needs model_var_type 'learned' or 'learned_range'",
    )

  # optimisation
  _number(config, "optim.lr", 0.0, 1.0, closed_low=False)
  _number(config, "optim.beta1", 0.0, 1.0, closed_high=False)
  _number(config, "optim.beta2", 0.0, 1.0, closed_high=False)
  _number(config, "optim.eps", 0.0, 1.0, closed_low=False)
  _int(config, "optim.warmup_steps", 0)
  _int(config, "optim.decay_steps", 0)
  _require(
      config.optim.decay_steps == 0 or config.optim.decay_steps > config.optim.warmup_steps,
      "optim.decay_steps",
      config.optim.decay_steps,
      f"must be 0 or above optim.warmup_steps ({config.optim.warmup_steps})",
  )
  _number(config, "optim.grad_clip", 0.0, float("inf"))
  _number(config, "optim.ema_decay", 0.0, 1.0)

  # training
  t = config.training
  _check_batches_split(config, num_devices, num_local_devices, device_hint)
  _int(config, "training.grad_accum_steps", 1)
  _require(
      (t.batch_size // num_devices) % t.grad_accum_steps == 0,
      "training.grad_accum_steps",
      t.grad_accum_steps,
      f"must divide the per-device batch {t.batch_size // max(num_devices, 1)}",
  )
  _int(config, "training.num_train_steps", 1)
  _int(config, "training.steps_per_call", 1)
  _choice(config, "training.multi_step_loop", ("auto", "scan", "unroll"))
  _choice(config, "training.grad_all_reduce", ("auto", "flat", "tree"))
  for field in ("num_train_steps", "checkpoint_every_steps", "log_every_steps"):
    v = t[field]
    _int(config, f"training.{field}", 1 if field != "checkpoint_every_steps" else 0)
    _require(
        v % t.steps_per_call == 0,
        f"training.{field}",
        v,
        f"must be a multiple of training.steps_per_call={t.steps_per_call}",
    )
  _int(config, "training.keep_checkpoints", 1)
  _int(config, "training.sample_every_steps", 0)
  _int(config, "training.num_grid_samples", 1)
  _int(config, "training.prefetch", 1)
  _choice(config, "training.nan_policy", ("skip", "stop"))
  _int(config, "training.max_consecutive_nonfinite", 1)
  _number(config, "training.p_uncond", 0.0, 1.0, closed_high=False)
  _choice(config, "training.t_sampler", ("uniform", "loss_aware"))
  _int(config, "training.debug_poison_step", -1)

  # sampling
  s = config.sampling
  _choice(config, "sampling.sampler", ("ancestral", "ddim", "dpm_solver++", "dpm_solver++_sde"))
  _choice(config, "sampling.timestep_spacing", ("uniform", "logsnr"))
  _bool(config, "sampling.thresholding")
  _number(config, "sampling.guidance_scale", 0.0, float("inf"))
  _int(config, "sampling.class_label", -1)
  k = config.model.num_classes
  _require(
      k > 0 or s.class_label == -1,
      "sampling.class_label",
      s.class_label,
      "picks a class of a class-conditional model: needs model.num_classes > 0; leave it -1",
  )
  _require(
      s.class_label < max(k, 0) or s.class_label == -1,
      "sampling.class_label",
      s.class_label,
      f"must be -1 (classes in turn) or a class in [0, model.num_classes={k})",
  )
  _require(
      k > 0 or s.guidance_scale == 0,
      "sampling.guidance_scale",
      s.guidance_scale,
      "guides a class-conditional model: needs model.num_classes > 0",
  )
  _require(
      s.sampler not in ("dpm_solver++", "dpm_solver++_sde")
      or config.diffusion.model_mean_type != "xprev",
      "sampling.sampler",
      s.sampler,
      "needs an 'eps', 'x0' or 'v' model, not 'xprev'",
  )
  _int(config, "sampling.num_steps", 0)
  _require(
      s.num_steps <= config.diffusion.num_timesteps,
      "sampling.num_steps",
      s.num_steps,
      f"must be 0 (all) or at most diffusion.num_timesteps={config.diffusion.num_timesteps}",
  )
  if s.sampler == "ddim" and s.num_steps:
    try:
      schedules.space_timesteps(config.diffusion.num_timesteps, f"ddim{s.num_steps}")
    except ValueError as e:
      raise ConfigError(f"config.sampling.num_steps={s.num_steps} is invalid: {e}") from None
  T = config.diffusion.num_timesteps
  # An 'xprev' network predicts the mean of one step of the T-step process; a respaced
  # sampler would take it for the mean of a whole jump (its images come out far too wide).
  _require(
      config.diffusion.model_mean_type != "xprev" or s.num_steps in (0, T),
      "sampling.num_steps",
      s.num_steps,
      f"an 'xprev' model (diffusion.model_mean_type) predicts the mean of one of the "
      f"{T} steps, so it samples with all of them only: use 0",
  )
  _number(config, "sampling.eta", 0.0, 1.0)
  # Settings of one sampler that another would silently ignore.
  _require(
      s.eta == 0 or s.sampler == "ddim",
      "sampling.eta",
      s.eta,
      f"only the 'ddim' sampler uses it, not sampling.sampler={s.sampler!r}; leave it 0",
  )
  _require(
      s.timestep_spacing == "uniform" or s.sampler in SPACED_SAMPLERS,
      "sampling.timestep_spacing",
      s.timestep_spacing,
      f"only the DPM-Solver++ samplers ({' and '.join(map(repr, SPACED_SAMPLERS))}) use it, not sampling.sampler="
      f"{s.sampler!r}; leave it 'uniform'",
  )
  _require(
      not s.thresholding or s.sampler in SPACED_SAMPLERS,
      "sampling.thresholding",
      s.thresholding,
      f"only the DPM-Solver++ samplers ({' and '.join(map(repr, SPACED_SAMPLERS))}) use it, not sampling.sampler="
      f"{s.sampler!r} (which clips with sampling.clip_denoised); leave it False",
  )
  _int(config, "sampling.num_samples", 1)
  _int(config, "sampling.batch_size", 1)
  _int(config, "sampling.checkpoint_step", -1)
  _bool(config, "sampling.clip_denoised")

  # evaluation
  _int(config, "eval.batch_size", 1)
  _int(config, "eval.num_examples", 0)
  _int(config, "eval.num_fid_samples", 2)
  _int(config, "eval.seed", 0)
  _int(config, "eval.figure_rows", 1)
  _int(config, "eval.figure_columns", 1)
  _int(config, "eval.interp_t", 0)
  _require(
      config.eval.interp_t <= T,
      "eval.interp_t",
      config.eval.interp_t,
      f"must be 0 (T/2) or a timestep 1..diffusion.num_timesteps={T}",
  )
  _int(config, "eval.interp_lambdas", 2)
