"""The train state (``TrainState``) and its Orbax checkpoints in ``workdir/checkpoints``.

Each step's checkpoint holds three items:
  state:      step, params, opt_state, rng (what resuming needs besides EMA)
  ema_params: the EMA parameters alone, so sampling restores only them
  meta:       JSON with the config fields that fix the parameter shapes and the
              meaning of the network (``ARCH_FIELDS``: the U-Net, the image
              shape, the diffusion process), so a workdir of another
              architecture or schedule is refused by name; whether the CPU
              kernels were in the program; CRC32s of the state and the EMA.
Orbax writes into a temporary directory and renames it when complete, so an
interrupted write is never taken for a checkpoint. Writes are synchronous: a
failure (e.g. a full disk) is raised by ``save`` itself. A checkpoint whose
files were damaged afterwards (truncated, overwritten, bit rot) fails its
checksum instead of being loaded, and resuming falls back to the one before it.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from typing import Any, Optional
import zlib

from absl import logging
import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from ddpm_jax import errors, files
from ddpm_jax.cpu import cpu_kernels_active


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


# The fields that determine parameter shapes and the meaning of the network.
ARCH_FIELDS = {
    "model": (
        "ch",
        "ch_mult",
        "num_res_blocks",
        "attn_resolutions",
        "resamp_with_conv",
        "num_classes",
    ),
    "data": ("image_size", "channels"),
    "diffusion": (
        "model_mean_type",
        "model_var_type",
        "num_timesteps",
        "beta_schedule",
        "beta_start",
        "beta_end",
    ),
}
CPU_KERNELS_KEY = "model.cpu_kernels_active"
T_SAMPLER_KEY = "training.t_sampler"


# Where a damaged checkpoint is moved (next to checkpoints/) when a run resumes
# from an older one: out of the way of the re-written step, but not deleted.
UNREADABLE_DIR = "checkpoints.unreadable"


def architecture(config) -> dict:
  """The config fields a checkpoint must agree with, JSON-ready: {'model.ch': 128, ...}."""
  out = {}
  for section, fields in ARCH_FIELDS.items():
    for f in fields:
      v = config[section][f]
      out[f"{section}.{f}"] = list(v) if isinstance(v, (tuple, list)) else v
  return out


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def create_manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """The orbax manager of ``workdir/checkpoints``: synchronous writes, the newest ``keep`` kept."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else keep,
      create=not read_only,
      read_only=read_only,
      cleanup_tmp_directories=not read_only,
      save_interval_steps=0 if read_only else 1,
      enable_async_checkpointing=False,
  )
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options, item_names=("state", "ema_params", "meta")
  )


def checksum(tree) -> str:
  """CRC32 over the leaves of ``tree`` (dtype, shape and bytes, in tree order)."""
  crc = 0
  for leaf in jax.tree.leaves(tree):
    a = np.ascontiguousarray(np.asarray(leaf))
    crc = zlib.crc32(f"{a.dtype.str}{a.shape}".encode(), crc)
    crc = zlib.crc32(a.reshape(-1).view(np.uint8), crc)
  return f"crc32:{crc:08x}"


def _core(state) -> dict:
  """The 'state' item: everything but the EMA (and the t sampler's history when there is one)."""
  core = {
      "step": state.step,
      "params": state.params,
      "opt_state": state.opt_state,
      "rng": state.rng,
  }
  if state.t_history is not None:
    core["t_history"] = state.t_history
  return core


def save(manager: ocp.CheckpointManager, state: TrainState, config) -> bool:
  """Writes ``state`` (host arrays) under its step; returns whether it wrote.

  A step that already has a checkpoint is not written again (a finished run
  started again, or a stop signal right after a periodic checkpoint): resuming
  is deterministic, so it holds this very state.

  Raises:
    StorageError: the storage refused the write, e.g. a full disk; the
      message says which complete checkpoint is left.
  """
  step = int(state.step)
  if step in manager.all_steps():
    logging.info(
        "The checkpoint of step %d already exists in %s; not written again.",
        step,
        manager.directory,
    )
    return False
  core = _core(state)
  meta = dict(architecture(config))
  meta[CPU_KERNELS_KEY] = cpu_kernels_active(config)
  meta[T_SAMPLER_KEY] = config.training.t_sampler
  meta["checksum.state"] = checksum(core)
  meta["checksum.ema_params"] = checksum(state.ema_params)
  _check_free_space(manager.directory, core, state.ema_params)
  try:
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(core),
            ema_params=ocp.args.StandardSave(state.ema_params),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )
  except Exception as e:  # pylint: disable=broad-except
    _ignore_orphaned_futures()
    message = storage_error_message(e, manager.directory)
    if message is None:
      raise
    error = errors.StorageError(message)
    error.errno = _storage_error_code(e)
    raise error from e
  return True


def _check_free_space(directory, *trees) -> None:
  """StorageError before a write that cannot fit: the arrays' bytes plus 1 MiB.

  Checked up front because orbax's writer threads print tracebacks of their own
  when the disk fills during a write (the failure then still raises here).
  """
  need = sum(np.asarray(x).nbytes for tree in trees for x in jax.tree.leaves(tree)) + (1 << 20)
  if shutil.disk_usage(str(directory)).free < need:
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    raise errors.StorageError(storage_error_message(error, directory)) from error


_STORAGE_ERRORS = files.STORAGE_ERRNOS
# Orbax (TensorStore) reports a failed write as ValueError("RESOURCE_EXHAUSTED: Error
# writing ... No space left on device"): match the OS's text.
_STORAGE_TEXTS = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
}


def complete_steps(directory) -> list[int]:
  """Steps with a finished checkpoint directory under ``directory`` (no orbax needed)."""
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _storage_error_code(error: BaseException) -> Optional[int]:
  """errno.ENOSPC etc. when ``error`` or one of its causes is the storage refusing a write."""
  seen, e = set(), error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRORS:
      return e.errno
    text = str(e)
    for t, code in _STORAGE_TEXTS.items():
      if t in text:
        return code
    e = e.__cause__ or e.__context__
  return None


def storage_error_message(
    error: BaseException, directory, where: Optional[str] = None
) -> Optional[str]:
  """One line for an exception caused by the storage refusing a write, else None.

  ``directory``: the checkpoint directory; the line says which complete
  checkpoint is left in it. ``where``: what could not be written (default: it).
  """
  if isinstance(error, errors.StorageError):
    return str(error)
  code = _storage_error_code(error)
  if code is None:
    return None
  directory = str(directory)
  steps = complete_steps(directory)
  left = (
      f"the newest complete checkpoint, step {steps[-1]}, is intact"
      if steps
      else "no complete checkpoint was written yet"
  )
  return (
      f"could not write to {where or directory}: {_STORAGE_ERRORS[code]}; {left} (unfinished "
      f"writes are ignored); free space and run the same command again to resume"
  )


def _is_read_only(manager) -> bool:
  options = getattr(manager, "_options", None)
  return bool(getattr(options, "read_only", False))


def _read_meta(manager, step: int) -> Optional[dict]:
  """The meta item of ``step``; None for older checkpoints without one.

  Raises CorruptCheckpointError when the item exists but cannot be read.
  """
  path = os.path.join(str(manager.directory), str(step), "meta")
  if not os.path.exists(path):
    return None
  try:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # pylint: disable=broad-except
    raise errors.CorruptCheckpointError(
        f"its meta item cannot be read ({type(e).__name__}: " f"{_first_line(e)})"
    ) from e


def _check_meta(manager, step: int, config) -> Optional[dict]:
  """Raises CheckpointMismatchError on another architecture; returns the meta (or None)."""
  meta = _read_meta(manager, step)
  if meta is None:
    return None  # older checkpoints without meta: shapes are checked on restore
  want = architecture(config)
  # Fields older checkpoints did not record are not compared.
  diff = {k: (meta[k], v) for k, v in want.items() if k in meta and meta[k] != v}
  if diff:
    lines = ", ".join(f"config.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
    raise errors.CheckpointMismatchError(
        f"{manager.directory} holds a checkpoint of another architecture or diffusion "
        f"process ({lines}); use another --workdir or the matching config"
    )
  return meta


def _verify(meta: Optional[dict], key: str, tree) -> None:
  want = (meta or {}).get(key)
  if want is None:
    return  # written before checksums were stored
  got = checksum(tree)
  if got != want:
    raise errors.CorruptCheckpointError(
        f"{key.split('.', 1)[1]} fails its checksum " f"(stored {want}, read {got})"
    )


def _ignore_orphaned_futures() -> None:
  """After a failed read or write, drop the 'Event loop is closed' errors orbax leaves behind.

  When one TensorStore read or write fails (a damaged checkpoint, a full disk),
  orbax closes its event loop while the other operations are still in flight;
  each of them later completes onto the closed loop, and Python reports that as
  an unraisable RuntimeError (dozens of tracebacks on stderr). They carry
  nothing: the failure itself is reported. Installed once, on the first
  failure; any other unraisable error still reaches the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "ddpm_jax_orphaned_reads", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)

  hook.ddpm_jax_orphaned_reads = True
  sys.unraisablehook = hook


def _first_line(e: BaseException) -> str:
  return (str(e).splitlines() or [""])[0][:300]


def _set_aside(manager, step: int) -> Optional[str]:
  """Moves an unreadable step directory to workdir/checkpoints.unreadable/; returns where."""
  if _is_read_only(manager):
    return None
  src = os.path.join(str(manager.directory), str(step))
  dst_root = os.path.join(os.path.dirname(str(manager.directory)), UNREADABLE_DIR)
  dst = os.path.join(dst_root, str(step))
  if os.path.exists(dst):
    dst = f"{dst}.{time.strftime('%Y%m%d-%H%M%S')}"
  moved = None
  if jax.process_index() == 0:
    try:
      os.makedirs(dst_root, exist_ok=True)
      shutil.move(src, dst)
      moved = dst
    except OSError as e:
      logging.warning("Could not move the unreadable checkpoint %s aside (%s).", src, e)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(f"ddpm_jax_set_aside_{step}")
  manager.reload()
  return moved


def _steps_newest_first(manager) -> list[int]:
  return sorted(manager.all_steps(), reverse=True)


def restore_train_state(
    manager: ocp.CheckpointManager, target: TrainState, config
) -> Optional[TrainState]:
  """The newest readable checkpoint as a TrainState shaped like ``target``, or None if none.

  A checkpoint that cannot be read (corrupt or truncated files, or data that
  fails its checksum) is skipped with a warning and the previous one is tried.
  Nothing is deleted: once an older checkpoint has been read, a writable
  manager moves the unreadable newer step directories to
  ``workdir/checkpoints.unreadable/``, so that the resumed run can write those
  steps again.

  Raises:
    CheckpointMismatchError: a checkpoint of another architecture.
    CorruptCheckpointError: there are checkpoints but none can be read (then
      nothing is moved: training from scratch over them is not done silently).
  """
  abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  core_target = abstract(_core(target))
  ema_target = abstract(target.ema_params)
  unreadable = []
  for step in _steps_newest_first(manager):
    try:
      meta = _check_meta(manager, step, config)
      _check_t_sampler(meta, config, manager.directory)
      out = manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(core_target),
              ema_params=ocp.args.StandardRestore(ema_target),
          ),
      )
      _verify(meta, "checksum.state", out["state"])
      _verify(meta, "checksum.ema_params", out["ema_params"])
    except errors.CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      _ignore_orphaned_futures()
      logging.warning(
          "Checkpoint at step %d could not be read (%s: %s); trying the one before.",
          step,
          type(e).__name__,
          _first_line(e),
      )
      unreadable.append((step, e))
      continue
    _warn_if_cpu_kernels_differ(meta, config, step)
    for bad, _ in unreadable:
      moved = _set_aside(manager, bad)
      if moved:
        logging.warning(
            "Resuming from step %d: moved the unreadable checkpoint of step %d to %s.",
            step,
            bad,
            moved,
        )
    core = out["state"]
    return TrainState(
        step=core["step"],
        params=core["params"],
        ema_params=out["ema_params"],
        opt_state=core["opt_state"],
        rng=core["rng"],
        t_history=core.get("t_history"),
    )
  if unreadable:
    step, e = unreadable[0]
    raise errors.CorruptCheckpointError(
        f"none of the checkpoints in {manager.directory} can be read (steps "
        f"{[s for s, _ in unreadable]}); nothing was changed: move them away to train from "
        f"scratch, or use another --workdir (step {step}: {type(e).__name__}: {_first_line(e)})"
    )
  return None


def _check_t_sampler(meta: Optional[dict], config, directory) -> None:
  """Resuming needs the same ``training.t_sampler``: its history is part of the state."""
  then = (meta or {}).get(T_SAMPLER_KEY, "uniform")
  if then != config.training.t_sampler:
    raise errors.CheckpointMismatchError(
        f"{directory} was trained with config.training.t_sampler={then!r}, the config says "
        f"{config.training.t_sampler!r}; resume with {then!r} or use another --workdir"
    )


def _warn_if_cpu_kernels_differ(meta: Optional[dict], config, step: int) -> None:
  """A resumed run whose ``model.cpu_kernels`` differs from the checkpoint's is not bitwise-exact."""
  then = (meta or {}).get(CPU_KERNELS_KEY)
  now = cpu_kernels_active(config)
  if then is not None and then != now:
    logging.warning(
        "The checkpoint of step %d was trained with the CPU kernels %s, this run has them %s "
        "(config.model.cpu_kernels=%s on %s): training goes on, but it is not bitwise the run "
        "it would have been (the kernels round floats differently).",
        step,
        "on" if then else "off",
        "on" if now else "off",
        config.model.cpu_kernels,
        jax.default_backend(),
    )


def restore_ema_params(
    manager: ocp.CheckpointManager, target_params: Any, config, step: int = -1
) -> tuple[Any, int]:
  """Only the EMA parameters of checkpoint ``step`` (-1: the newest readable one).

  Returns (params shaped like ``target_params``, the step read). Raises
  NoCheckpointError, CheckpointMismatchError or CorruptCheckpointError.
  """
  steps = _steps_newest_first(manager) if step < 0 else [step]
  if not steps:
    raise errors.NoCheckpointError(
        f"no checkpoint in {manager.directory}: train first "
        "(--mode=train) or point --workdir at a trained run"
    )
  if step >= 0 and step not in manager.all_steps():
    raise errors.NoCheckpointError(
        f"no checkpoint at step {step} in {manager.directory}; "
        f"available: {sorted(manager.all_steps())}"
    )
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_params)
  last_error = None
  for s in steps:
    try:
      meta = _check_meta(manager, s, config)
      out = manager.restore(
          s, args=ocp.args.Composite(ema_params=ocp.args.StandardRestore(abstract))
      )
      _verify(meta, "checksum.ema_params", out["ema_params"])
      return out["ema_params"], s
    except errors.CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      _ignore_orphaned_futures()
      logging.warning(
          "Checkpoint at step %d could not be read (%s: %s)%s.",
          s,
          type(e).__name__,
          _first_line(e),
          "; trying the one before" if s != steps[-1] else "",
      )
      last_error = e
  raise errors.CorruptCheckpointError(
      f"no readable checkpoint in {manager.directory} (tried steps {steps}; the last error: "
      f"{type(last_error).__name__}: {_first_line(last_error)})"
  )
