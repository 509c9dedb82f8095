"""Orbax checkpoints of the train state in ``workdir/checkpoints``.

Each step's checkpoint holds three items:
  state:      step, params, opt_state, rng (what resuming needs besides EMA)
  ema_params: the EMA parameters alone, so sampling restores only them
  meta:       JSON with the model/diffusion/data fields that fix the parameter
              shapes, so a workdir of another architecture is refused clearly.
Orbax writes into a temporary directory and renames it when complete, so an
interrupted write is never taken for a checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from absl import logging
import jax
import orbax.checkpoint as ocp

from ddpm_jax.train import TrainState

# The fields that determine parameter shapes and the meaning of the network.
_ARCH_FIELDS = {
    "model": ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resamp_with_conv",
              "num_classes"),
    "data": ("image_size", "channels"),
    "diffusion": ("model_mean_type", "model_var_type", "num_timesteps"),
}


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint of another architecture."""


def architecture(config) -> dict:
  """The config fields a checkpoint must agree with, JSON-ready."""
  out = {}
  for section, fields in _ARCH_FIELDS.items():
    for f in fields:
      v = config[section][f]
      out[f"{section}.{f}"] = list(v) if isinstance(v, (tuple, list)) else v
  return out


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def create_manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         read_only=read_only, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "ema_params", "meta"))


def save(manager: ocp.CheckpointManager, state: TrainState, config) -> None:
  """Writes ``state`` (host arrays) under its step; returns while it is written."""
  step = int(state.step)
  core = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "rng": state.rng}
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(core),
      ema_params=ocp.args.StandardSave(state.ema_params),
      meta=ocp.args.JsonSave(architecture(config))), force=True)


def _check_meta(manager, step: int, config) -> None:
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception:  # pylint: disable=broad-except
    return  # older checkpoints without meta: shapes are checked on restore
  want = architecture(config)
  diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
  if diff:
    lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
    raise CheckpointMismatchError(
        f"{manager.directory} holds a checkpoint of another architecture ({lines}); "
        "use another --workdir or the matching config")


def _steps_newest_first(manager) -> list[int]:
  return sorted(manager.all_steps(), reverse=True)


def restore_train_state(manager: ocp.CheckpointManager, target: TrainState,
                        config) -> Optional[TrainState]:
  """The newest readable checkpoint as a TrainState shaped like ``target``, or None.

  A checkpoint that cannot be read (corrupt or truncated files) is skipped with
  a warning and the previous one is tried; nothing is deleted.
  """
  core_target = {"step": target.step, "params": target.params,
                 "opt_state": target.opt_state, "rng": target.rng}
  abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  for step in _steps_newest_first(manager):
    _check_meta(manager, step, config)
    try:
      out = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract(core_target)),
          ema_params=ocp.args.StandardRestore(abstract(target.ema_params))))
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Checkpoint at step %d could not be read (%s: %s); trying the one before.",
                      step, type(e).__name__, str(e).splitlines()[0][:300])
      continue
    core = out["state"]
    return TrainState(step=core["step"], params=core["params"], ema_params=out["ema_params"],
                      opt_state=core["opt_state"], rng=core["rng"])
  return None


def restore_ema_params(manager: ocp.CheckpointManager, target_params: Any, config,
                       step: int = -1) -> tuple[Any, int]:
  """Only the EMA parameters of checkpoint ``step`` (-1: the newest readable one)."""
  steps = _steps_newest_first(manager) if step < 0 else [step]
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}: train first "
                            "(--mode=train) or point --workdir at a trained run")
  if step >= 0 and step not in manager.all_steps():
    raise FileNotFoundError(f"no checkpoint at step {step} in {manager.directory}; "
                            f"available: {sorted(manager.all_steps())}")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_params)
  last_error = None
  for s in steps:
    _check_meta(manager, s, config)
    try:
      out = manager.restore(s, args=ocp.args.Composite(
          ema_params=ocp.args.StandardRestore(abstract)))
      return out["ema_params"], s
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Checkpoint at step %d could not be read (%s); trying the one before.", s, e)
      last_error = e
  raise ValueError(f"no readable checkpoint in {manager.directory}: {last_error}")
