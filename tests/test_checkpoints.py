"""ddpm_jax/checkpoints.py: another architecture, no or a damaged checkpoint, a full disk: one line each."""

import errno
import glob
import logging
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
from ddpm_jax import checkpoints, errors
from helpers import complete_steps, save_checkpoint


def test_checkpoint_of_another_architecture_is_refused(tmp_path, host_state):
  workdir = str(tmp_path)
  save_checkpoint(workdir, host_state, 3)
  config = test_config.get_config()
  config.model.ch, config.model.num_res_blocks = 64, 2
  manager = checkpoints.create_manager(workdir)
  with pytest.raises(errors.CheckpointMismatchError) as e:
    checkpoints.restore_train_state(manager, host_state, config)
  assert str(e.value) == (
      f"{workdir}/checkpoints holds a checkpoint of another architecture or diffusion process "
      "(config.model.ch: checkpoint 32 vs config 64, config.model.num_res_blocks: checkpoint 1 "
      "vs config 2); use another --workdir or the matching config"
  )
  assert complete_steps(workdir) == [3]  # untouched


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path, host_state):
  workdir = str(tmp_path)
  save_checkpoint(workdir, host_state, 3)
  step_dir = os.path.join(checkpoints.checkpoint_dir(workdir), "3")
  for path in glob.glob(os.path.join(step_dir, "*", "ocdbt.process_0", "d", "*")):
    os.remove(path)
  manager = checkpoints.create_manager(workdir)
  with pytest.raises(errors.CorruptCheckpointError) as e:
    checkpoints.restore_train_state(manager, host_state, test_config.get_config())
  assert re.fullmatch(
      rf"none of the checkpoints in {re.escape(workdir)}/checkpoints can be read \(steps \[3\]\); "
      r"nothing was changed: move them away to train from scratch, or use another --workdir "
      r"\(step 3: \w+: .*\)",
      str(e.value),
  ), str(e.value)
  assert os.path.isdir(step_dir)


def test_sampling_without_a_checkpoint(tmp_path, host_state):
  manager = checkpoints.create_manager(str(tmp_path))
  with pytest.raises(errors.NoCheckpointError) as e:
    checkpoints.restore_ema_params(manager, host_state.ema_params, test_config.get_config())
  assert str(e.value) == (
      f"no checkpoint in {tmp_path}/checkpoints: train first (--mode=train) "
      "or point --workdir at a trained run"
  )


def test_sampling_a_checkpoint_step_that_does_not_exist(tmp_path, host_state):
  manager = save_checkpoint(str(tmp_path), host_state, 3)
  with pytest.raises(errors.NoCheckpointError) as e:
    checkpoints.restore_ema_params(manager, host_state.ema_params, test_config.get_config(), step=7)
  assert str(e.value) == f"no checkpoint at step 7 in {tmp_path}/checkpoints; available: [3]"


def test_disk_full_at_save_keeps_the_earlier_checkpoint(tmp_path, host_state, monkeypatch):
  workdir = str(tmp_path)
  manager = save_checkpoint(workdir, host_state, 3)
  ckpt_dir = checkpoints.checkpoint_dir(workdir)
  expected = (
      f"could not write to {ckpt_dir}: no space left on device; the newest complete "
      "checkpoint, step 3, is intact (unfinished writes are ignored); free space and run "
      "the same command again to resume"
  )

  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(ckpt_dir, "4"))

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  with pytest.raises(errors.StorageError) as e:
    checkpoints.save(manager, host_state.replace(step=np.int32(4)), test_config.get_config())
  assert str(e.value) == expected and e.value.errno == errno.ENOSPC
  # How orbax reports a failed asynchronous write at the next save or wait.
  async_failure = ValueError(
      'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local file "x": '
      "Failed to write 4612096 bytes to file 6: No space left on device [os_error_code='28']"
  )
  assert checkpoints.storage_error_message(async_failure, ckpt_dir) == expected
  # A device out of memory is RESOURCE_EXHAUSTED too, but not a storage problem.
  assert (
      checkpoints.storage_error_message(
          ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"), ckpt_dir
      )
      is None
  )
  monkeypatch.undo()
  restored = checkpoints.restore_train_state(
      checkpoints.create_manager(workdir, read_only=True), host_state, test_config.get_config()
  )
  assert int(restored.step) == 3


def test_saving_a_step_that_exists_is_a_no_op(tmp_path, host_state):
  """A finished run started again (or SIGTERM right after a periodic checkpoint)."""
  manager = save_checkpoint(str(tmp_path), host_state, 3)
  changed = host_state.replace(params=jax.tree.map(lambda p: p + 1, host_state.params))
  assert not checkpoints.save(manager, changed.replace(step=np.int32(3)), test_config.get_config())
  assert manager.all_steps() == [3]


def test_sampling_with_another_noise_schedule_is_refused(tmp_path, host_state):
  manager = save_checkpoint(str(tmp_path), host_state, 3)
  config = test_config.get_config()
  config.diffusion.beta_schedule = "cosine"
  with pytest.raises(errors.CheckpointMismatchError) as e:
    checkpoints.restore_ema_params(manager, host_state.ema_params, config)
  assert "config.diffusion.beta_schedule: checkpoint 'linear' vs config 'cosine'" in str(e.value)
  config = test_config.get_config()
  config.diffusion.num_timesteps, config.diffusion.beta_end = 50, 0.3
  with pytest.raises(errors.CheckpointMismatchError, match="diffusion.num_timesteps.*beta_end"):
    checkpoints.restore_ema_params(manager, host_state.ema_params, config)
  config = test_config.get_config()
  config.sampling.num_steps = 10  # respacing the trained schedule is fine
  _, step = checkpoints.restore_ema_params(manager, host_state.ema_params, config)
  assert step == 3


def test_orbax_read_only_notice_is_not_logged():
  from ddpm_jax import host  # pylint: disable=g-import-not-at-top

  make = lambda msg, level: logging.LogRecord("orbax", level, "/x/orbax/m.py", 1, msg, (), None)
  keep = host._OwnInfoOnly()  # pylint: disable=protected-access
  assert not keep.filter(make("Given directory is read only=%s", logging.WARNING))
  assert keep.filter(make("%s is read only, save will be skipped", logging.WARNING))
