"""Bad inputs get one clear line: config, data, checkpoints, workdir, disk.

Most cases call the checking code in this process. The ``main.py`` cases check
what a user sees: exit status 1, exactly one ``error: ...`` line on stderr (the
same text is also logged), and no Python traceback.
"""

import errno
import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
from ddpm_jax import builders, checkpoints, config_validation, errors
from ddpm_jax.data import sources
from ddpm_jax.training import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILE_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]  # the session's cache (conftest.py)
# The session's XLA_FLAGS, if any, and two devices.
ENV = {
    "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2",
    "JAX_COMPILATION_CACHE_DIR": COMPILE_CACHE,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}
IMAGE_EXTS = ".png, .jpg, .jpeg, .webp, .bmp"


def complete_steps(workdir):
  """Steps with a finished (renamed) checkpoint directory in ``workdir``."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n)))


def cli(*args, workdir=None, config="configs/test.py", timeout=600):
  """Runs main.py; returns (exit code, stderr)."""
  cmd = [sys.executable, os.path.join(ROOT, "main.py")]
  if config:
    cmd.append(f"--config={config}")
  if workdir:
    cmd.append(f"--workdir={workdir}")
  r = subprocess.run(
      cmd + list(args),
      cwd=ROOT,
      env={**os.environ, **ENV},
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  return r.returncode, r.stderr


def assert_one_line_error(rc, stderr, expected):
  """Exit 1, exactly one 'error:' line equal to ``expected`` (str) or matching it (Pattern)."""
  assert rc == 1, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, stderr[-3000:]
  if isinstance(expected, re.Pattern):
    assert expected.fullmatch(lines[0]), lines[0]
  else:
    assert lines[0] == expected
  assert "Traceback" not in stderr and "Event loop is closed" not in stderr, stderr[-3000:]
  assert stderr.count(lines[0][len("error: ") :]) == 1, stderr[-3000:]  # not logged as well
  return lines[0]


# ----------------------------------------------------------------------------
# Config: config_validation.validate, in process
# ----------------------------------------------------------------------------


def validation_error(num_devices=2, **overrides):
  config = test_config.get_config()
  for path, value in overrides.items():
    section, name = path.split("__")
    config[section][name] = value
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate(config, num_devices, num_devices)
  return str(e.value)


def test_the_test_config_is_valid():
  config_validation.validate(test_config.get_config(), 2, 2)


def test_unknown_beta_schedule():
  assert validation_error(diffusion__beta_schedule="linearr") == (
      "config.diffusion.beta_schedule='linearr' is invalid: must be one of ('linear', 'quad', "
      "'const', 'jsd', 'warmup10', 'warmup50', 'cosine')"
  )


def test_batch_size_not_divisible_by_device_count():
  assert validation_error(training__batch_size=3) == (
      "config.training.batch_size=3 is invalid: must be divisible by the number of devices (2)"
  )


def test_image_size_too_small_for_unet_depth():
  assert validation_error(model__ch_mult=(1, 2, 2, 2, 2)) == (
      "config.data.image_size=8 is invalid: must be divisible by 2**(len(model.ch_mult)-1) = 16 "
      "(model.ch_mult=(1, 2, 2, 2, 2))"
  )


def test_cosine_decay_ending_inside_the_warmup():
  assert validation_error(optim__warmup_steps=100, optim__decay_steps=50) == (
      "config.optim.decay_steps=50 is invalid: must be 0 or above optim.warmup_steps (100)"
  )


def test_attention_resolution_not_in_unet():
  assert validation_error(model__attn_resolutions=(16,)) == (
      "config.model.attn_resolutions=(16,) is invalid: each must be one of the U-Net's "
      "resolutions [4, 8]"
  )


def test_class_settings_that_cannot_apply():
  assert validation_error(sampling__guidance_scale=2.0) == (
      "config.sampling.guidance_scale=2.0 is invalid: guides a class-conditional model: needs "
      "model.num_classes > 0"
  )
  assert validation_error(model__num_classes=10, sampling__class_label=10) == (
      "config.sampling.class_label=10 is invalid: must be -1 (classes in turn) or a class in "
      "[0, model.num_classes=10)"
  )
  assert validation_error(training__t_sampler="importance") == (
      "config.training.t_sampler='importance' is invalid: must be one of ('uniform', "
      "'loss_aware')"
  )


def test_unknown_dataset():
  assert validation_error(data__dataset="mnist") == (
      "config.data.dataset='mnist' is invalid: must be one of ('digits', 'cifar10', "
      "'celeb_a_hq/256', 'lsun/church_outdoor', 'lsun/bedroom', 'lsun/cat', 'folder')"
  )


def test_channels_do_not_fit_dataset():
  assert validation_error(data__channels=3) == (
      "config.data.channels=3 is invalid: digits are grayscale: 1"
  )


def test_ddim_steps_not_expressible_with_an_integer_stride():
  assert validation_error(sampling__sampler="ddim", sampling__num_steps=30) == (
      "config.sampling.num_steps=30 is invalid: sampler respacing 'ddim30': cannot make "
      "exactly 30 steps with an integer stride of 100"
  )


def test_sampler_steps_above_num_timesteps():
  assert validation_error(sampling__num_steps=101) == (
      "config.sampling.num_steps=101 is invalid: must be 0 (all) or at most "
      "diffusion.num_timesteps=100"
  )


def test_ddim_eta_out_of_range():
  assert validation_error(sampling__eta=1.5) == (
      "config.sampling.eta=1.5 is invalid: must be a number in [0.0, 1.0]"
  )


def test_nan_policy_unknown():
  assert validation_error(training__nan_policy="ignore") == (
      "config.training.nan_policy='ignore' is invalid: must be one of ('skip', 'stop')"
  )


def test_grad_all_reduce_unknown():
  assert validation_error(training__grad_all_reduce="ring") == (
      "config.training.grad_all_reduce='ring' is invalid: must be one of ('auto', 'flat', 'tree')"
  )


def test_max_consecutive_nonfinite_zero():
  assert validation_error(training__max_consecutive_nonfinite=0) == (
      "config.training.max_consecutive_nonfinite=0 is invalid: must be an integer >= 1"
  )


def test_folder_that_does_not_exist(tmp_path):
  missing = str(tmp_path / "missing")
  assert validation_error(data__dataset="folder", data__folder=missing) == (
      f"config.data.folder={missing!r} is invalid: must name an existing directory of images "
      "for dataset='folder'"
  )


def test_folder_without_image_files(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "notes.txt").write_text("no images here")
  assert validation_error(data__dataset="folder", data__folder=str(tmp_path)) == (
      f"config.data.folder={str(tmp_path)!r} is invalid: holds no image file ({IMAGE_EXTS}) "
      "in it or its subdirectories"
  )


# ----------------------------------------------------------------------------
# Data: ddpm_jax.data, in process
# ----------------------------------------------------------------------------


def _write_images(folder, good, bad):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(good):
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(
        os.path.join(folder, f"good{i}.png")
    )
  for i in range(bad):
    with open(os.path.join(folder, f"bad{i}.png"), "wb") as f:
      f.write(b"\x89PNG\r\n\x1a\n this is not an image")


def test_undecodable_images_are_skipped_and_counted(tmp_path, caplog):
  folder = str(tmp_path / "images")
  _write_images(folder, good=3, bad=2)
  with caplog.at_level(logging.WARNING):
    split, skipped = sources.load_image_folder(folder, 8, channels=1)
  assert split.images.shape == (3, 8, 8, 1) and skipped == 2
  assert f"Skipped 2 of 5 image files under {folder} that could not be decoded." in caplog.text


def test_folder_with_only_undecodable_images(tmp_path):
  folder = str(tmp_path / "images")
  _write_images(folder, good=0, bad=2)
  with pytest.raises(errors.DataError) as e:
    sources.load_image_folder(folder, 8, channels=1)
  assert str(e.value) == (
      f"No decodable image ({IMAGE_EXTS}) under data.folder={folder!r} " "(2 undecodable files)."
  )


def test_tfds_dataset_not_prepared_fails_at_once_with_instructions(tmp_path):
  config = test_config.get_config()
  config.data.dataset, config.data.channels = "cifar10", 3
  config.data.data_dir = str(tmp_path)
  with pytest.raises(errors.DataNotPreparedError) as e:
    sources.get_tfds_builder(config.data)
  message = str(e.value)
  assert re.match(
      rf"TFDS data set 'cifar10' \(version [\d.]+\) is not prepared: no "
      rf"dataset_info.json in {re.escape(str(tmp_path))}/cifar10/[\d.]+\. Nothing is "
      r"downloaded here\.",
      message,
  ), message
  assert f"tfds build cifar10 --data_dir={tmp_path}" in message


# ----------------------------------------------------------------------------
# Checkpoints, in process
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host_state():
  config = test_config.get_config()
  model, tx = builders.build_model(config), builders.create_optimizer(config.optim)
  return jax.device_get(state_lib.create_train_state(config, model, tx))


def _save(workdir, state, step, config=None):
  manager = checkpoints.create_manager(workdir)
  checkpoints.save(manager, state.replace(step=np.int32(step)), config or test_config.get_config())
  return manager


def test_checkpoint_of_another_architecture_is_refused(tmp_path, host_state):
  workdir = str(tmp_path)
  _save(workdir, host_state, 3)
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
  _save(workdir, host_state, 3)
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
  manager = _save(str(tmp_path), host_state, 3)
  with pytest.raises(errors.NoCheckpointError) as e:
    checkpoints.restore_ema_params(manager, host_state.ema_params, test_config.get_config(), step=7)
  assert str(e.value) == f"no checkpoint at step 7 in {tmp_path}/checkpoints; available: [3]"


def test_disk_full_at_save_keeps_the_earlier_checkpoint(tmp_path, host_state, monkeypatch):
  workdir = str(tmp_path)
  manager = _save(workdir, host_state, 3)
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
  manager = _save(str(tmp_path), host_state, 3)
  changed = host_state.replace(params=jax.tree.map(lambda p: p + 1, host_state.params))
  assert not checkpoints.save(manager, changed.replace(step=np.int32(3)), test_config.get_config())
  assert manager.all_steps() == [3]


# ----------------------------------------------------------------------------
# The command line (main.py)
# ----------------------------------------------------------------------------


def test_cli_misspelled_override_names_the_field():
  rc, err = cli("--config.training.batchsize=3", workdir="/nonexistent-unused")
  assert_one_line_error(
      rc,
      err,
      (
          "error: --config.training.batchsize: the config has no field 'training.batchsize' (did you "
          "mean --config.training.batch_size?); the fields are listed in "
          "ddpm_jax/config_schema.py"
      ),
  )


def test_cli_misspelled_section_and_bad_literal_and_missing_config_file():
  rc, err = cli("--config.trainin.batch_size=3", workdir="/nonexistent-unused")
  assert_one_line_error(
      rc,
      err,
      (
          "error: --config.trainin.batch_size: the config has no field 'trainin.batch_size' (did you "
          "mean --config.training.batch_size?); the fields are listed in "
          "ddpm_jax/config_schema.py"
      ),
  )
  rc, err = cli("--config.training.batch_size=abc", workdir="/nonexistent-unused")
  assert_one_line_error(rc, err, "error: --config.training.batch_size=abc: not an integer")
  rc, err = cli(workdir="/nonexistent-unused", config="configs/nope.py")
  assert_one_line_error(rc, err, "error: --config=configs/nope.py: no such file")


@pytest.mark.parametrize(
    "override,expected",
    [
        (
            "--config.diffusion.beta_schedule=linearr",
            "error: config.diffusion.beta_schedule='linearr' is invalid: must be one of ('linear', "
            "'quad', 'const', 'jsd', 'warmup10', 'warmup50', 'cosine')",
        ),
        (
            "--config.training.batch_size=3",
            "error: config.training.batch_size=3 is invalid: must be divisible by the number of "
            "devices (2); the CPU device count comes from XLA_FLAGS' "
            "--xla_force_host_platform_device_count: 1 would divide every batch size",
        ),
        (
            "--config.model.cpu_kernels=maybe",
            "error: --config.model.cpu_kernels=maybe: not True or False",
        ),
    ],
)
@pytest.mark.slow
def test_cli_invalid_value(tmp_path, override, expected):
  rc, err = cli(override, workdir=str(tmp_path))
  assert_one_line_error(rc, err, expected)


@pytest.mark.slow
def test_cli_workdir_under_a_regular_file(tmp_path):
  """Root ignores permission bits, so an unwritable workdir is made with a file in its path."""
  blocker = tmp_path / "file"
  blocker.write_text("")
  rc, err = cli(workdir=str(blocker / "sub"))
  assert_one_line_error(
      rc,
      err,
      f"error: --workdir={blocker}/sub cannot be created: {blocker} is " "a file, not a directory",
  )
  rc, err = cli(workdir=str(blocker))
  assert_one_line_error(rc, err, f"error: --workdir={blocker} is a file, not a directory")


@pytest.mark.slow
def test_cli_tfds_not_prepared_fails_before_building_the_model(tmp_path):
  data_dir = str(tmp_path / "tfds")
  os.makedirs(data_dir)
  rc, err = cli(
      "--config.data.dataset=cifar10",
      "--config.data.channels=3",
      f"--config.data.data_dir={data_dir}",
      workdir=str(tmp_path / "run"),
  )
  line = assert_one_line_error(
      rc,
      err,
      re.compile(
          rf"error: TFDS data set 'cifar10' \(version [\d.]+\) is not prepared: .* tfds build cifar10 "
          rf"--data_dir={re.escape(data_dir)} and copy the folder .*"
      ),
  )
  assert "Model:" not in err  # failed before the model was built and compiled
  assert line.startswith("error: TFDS data set 'cifar10'")


@pytest.mark.slow
def test_cli_folder_with_only_undecodable_images(tmp_path):
  folder = str(tmp_path / "images")
  _write_images(folder, good=0, bad=2)
  rc, err = cli(
      "--config.data.dataset=folder",
      f"--config.data.folder={folder}",
      workdir=str(tmp_path / "run"),
  )
  assert_one_line_error(
      rc,
      err,
      f"error: No decodable image ({IMAGE_EXTS}) under "
      f"data.folder={folder!r} (2 undecodable files).",
  )
  assert not os.path.exists(tmp_path / "run")  # the failed run removed the workdir it made


@pytest.mark.slow
def test_cli_workdir_of_another_architecture(tmp_path, host_state):
  workdir = str(tmp_path / "run")
  _save(workdir, host_state, 3)
  rc, err = cli("--config.model.ch=64", workdir=workdir)
  assert_one_line_error(
      rc,
      err,
      (
          f"error: {workdir}/checkpoints holds a checkpoint of another architecture or diffusion "
          "process (config.model.ch: checkpoint 32 vs config 64); use another --workdir or the "
          "matching config"
      ),
  )


@pytest.fixture
def small_tmpfs(tmp_path):
  """A 16 MiB file system: room for one checkpoint of configs/test.py (11 MB), not two."""
  mount_point = tmp_path / "small"
  mount_point.mkdir()
  r = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
      capture_output=True,
      text=True,
  )
  if r.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
  try:
    yield str(mount_point)
  finally:
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.slow
def test_cli_disk_full_at_checkpoint_time_then_resume(small_tmpfs):
  workdir = os.path.join(small_tmpfs, "run")
  args = ("--config.training.num_train_steps=8", "--config.training.checkpoint_every_steps=4")
  rc, err = cli(*args, workdir=workdir)
  assert_one_line_error(
      rc,
      err,
      (
          f"error: could not write to {workdir}/checkpoints: no space left on device; the newest "
          "complete checkpoint, step 4, is intact (unfinished writes are ignored); free space and "
          "run the same command again to resume"
      ),
  )
  subprocess.run(["mount", "-o", "remount,size=64m", small_tmpfs], check=True)
  rc, err = cli(*args, workdir=workdir)
  assert rc == 0, err[-3000:]
  assert "Resumed from the checkpoint at step 4 " in err
  assert complete_steps(workdir)[-1] == 8


# ----------------------------------------------------------------------------
# Config files, the run record, half-written files, the noise schedule
# ----------------------------------------------------------------------------

BROKEN_CONFIGS = {
    "syntax": ("def get_config(:\n", r"bad\.py:1: SyntaxError: .*"),
    "no_get_config": ("X = 1\n", r"the file defines no get_config\(\)"),
    "wrong_type": (
        "def get_config():\n  return [1, 2]\n",
        r"get_config\(\) returned list, not an ml_collections.ConfigDict",
    ),
    "failing_import": (
        "import no_such_module_here\n",
        r"bad\.py:1: ModuleNotFoundError: No module named 'no_such_module_here'",
    ),
    "raises": ("def get_config():\n  return {}['data']\n", r"bad\.py:2: KeyError: 'data'"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN_CONFIGS))
def test_a_broken_config_file_is_one_line(tmp_path, kind):
  from ddpm_jax import config_loading  # pylint: disable=g-import-not-at-top

  text, pattern = BROKEN_CONFIGS[kind]
  path = tmp_path / "bad.py"
  path.write_text(text)
  with pytest.raises(errors.ConfigError) as e:
    config_loading.load(str(path))
  assert re.fullmatch(rf"--config={re.escape(str(path))}: (.*/)?{pattern}", str(e.value)), str(
      e.value
  )


def test_cli_broken_config_extra_argument_and_negative_devices(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("def get_config(:\n")
  rc, err = cli(workdir=str(tmp_path / "w"), config=str(path))
  assert_one_line_error(
      rc, err, re.compile(rf"error: --config={re.escape(str(path))}: .*bad\.py:1: SyntaxError: .*")
  )
  rc, err = cli("extra", workdir=str(tmp_path / "w"))
  assert_one_line_error(
      rc, err, "error: unexpected argument 'extra' (flags are --name=value; see --helpfull)"
  )
  rc, err = cli("--cpu_devices=-1", workdir=str(tmp_path / "w"))
  assert_one_line_error(
      rc,
      err,
      "error: flag --cpu_devices=-1: -1 is not a non-negative integer (see --helpfull)",
  )
  assert not os.path.exists(tmp_path / "w")  # nothing was created


@pytest.mark.slow
def test_a_refused_or_empty_run_leaves_the_record_alone(tmp_path):
  workdir = str(tmp_path / "run")
  record = os.path.join(workdir, "config_train.json")
  rc, err = cli("--config.training.num_train_steps=2", workdir=workdir)
  assert rc == 0, err[-3000:]
  with open(record) as f:
    written = f.read()
  assert json.loads(written)["model"]["ch"] == 32
  rc, err = cli("--config.model.ch=64", "--config.training.num_train_steps=2", workdir=workdir)
  assert rc == 1 and "another architecture" in err
  rc, err = cli("--config.training.num_train_steps=1", workdir=workdir)
  assert rc == 0, err[-3000:]
  assert "workdir is at step 2 >= num_train_steps 1: nothing to train" in err
  assert "Checkpoint at step" not in err  # no checkpoint is said to be written
  with open(record) as f:
    assert f.read() == written  # neither run replaced the record of the checkpoints


def _full_disk(monkeypatch):
  """Writes to temporary files (files.atomic_open) fail with ENOSPC after half their bytes."""
  real_open = open

  class Full:

    def __init__(self, f):
      self._f = f

    def write(self, data):
      self._f.write(data[: len(data) // 2])
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
      return getattr(self._f, name)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return self._f.__exit__(*exc)

  def fake_open(path, mode="r", *args, **kwargs):
    f = real_open(path, mode, *args, **kwargs)
    return Full(f) if ".tmp" in os.path.basename(str(path)) and "w" in mode else f

  monkeypatch.setattr("builtins.open", fake_open)


def test_a_full_disk_leaves_no_half_written_samples_or_record(tmp_path, monkeypatch):
  from ddpm_jax import sample, workdirs  # pylint: disable=g-import-not-at-top

  images = np.zeros((4, 8, 8, 1), np.uint8)
  _full_disk(monkeypatch)
  with pytest.raises(errors.StorageError, match="no space left on device"):
    sample.write_samples(str(tmp_path), images, "step1_ancestral100_seed1")
  with pytest.raises(errors.StorageError, match="no space left on device"):
    workdirs.write_record(test_config.get_config(), str(tmp_path), "train")
  monkeypatch.undo()
  assert os.listdir(tmp_path) == []  # no final file, no temporary one


def test_a_full_disk_when_taking_the_lock_is_one_line(tmp_path, monkeypatch):
  from ddpm_jax import workdirs  # pylint: disable=g-import-not-at-top

  def no_space(fd, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(workdirs.os, "write", no_space)
  with pytest.raises(errors.StorageError) as e:
    workdirs.Lock(str(tmp_path)).acquire()
  assert str(e.value) == (
      f"could not take the lock {tmp_path}/.lock: no space left on device; nothing was written"
  )
  monkeypatch.undo()
  workdirs.Lock(str(tmp_path)).acquire().release()  # the descriptor was closed: not held


def test_sampling_with_another_noise_schedule_is_refused(tmp_path, host_state):
  manager = _save(str(tmp_path), host_state, 3)
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


# ----------------------------------------------------------------------------
# Settings that would be silently wrong or do nothing; devices; process flags
# ----------------------------------------------------------------------------


def test_an_xprev_model_samples_with_all_steps_only():
  """x_{t-1} predicted for one step of T is not the mean of a respaced jump: refused by name."""
  expected = (
      "config.sampling.num_steps=10 is invalid: an 'xprev' model (diffusion.model_mean_type) "
      "predicts the mean of one of the 100 steps, so it samples with all of them only: use 0"
  )
  for sampler in ("ancestral", "ddim"):
    assert (
        validation_error(
            diffusion__model_mean_type="xprev", sampling__sampler=sampler, sampling__num_steps=10
        )
        == expected
    )
  for sampler, steps in (("ancestral", 0), ("ddim", 100), ("ancestral", 100)):
    config = test_config.get_config()
    config.diffusion.model_mean_type = "xprev"
    config.sampling.sampler, config.sampling.num_steps = sampler, steps
    config_validation.validate(config, 2, 2)


def test_settings_that_would_do_nothing_are_refused_by_name():
  assert validation_error(sampling__eta=0.5) == (
      "config.sampling.eta=0.5 is invalid: only the 'ddim' sampler uses it, not "
      "sampling.sampler='ancestral'; leave it 0"
  )
  for sampler in ("ancestral", "ddim"):
    assert validation_error(sampling__sampler=sampler, sampling__timestep_spacing="logsnr") == (
        "config.sampling.timestep_spacing='logsnr' is invalid: only the DPM-Solver++ samplers ('dpm_solver++' and "
        "'dpm_solver++_sde') use it, not "
        f"sampling.sampler={sampler!r}; leave it 'uniform'"
    )
    assert validation_error(sampling__sampler=sampler, sampling__thresholding=True) == (
        "config.sampling.thresholding=True is invalid: only the DPM-Solver++ samplers ('dpm_solver++' and "
        "'dpm_solver++_sde') use it, not "
        f"sampling.sampler={sampler!r} (which clips with sampling.clip_denoised); leave it False"
    )
  assert validation_error(eval__interp_t=101) == (
      "config.eval.interp_t=101 is invalid: must be 0 (T/2) or a timestep "
      "1..diffusion.num_timesteps=100"
  )
  assert validation_error(sampling__class_label=3) == (
      "config.sampling.class_label=3 is invalid: picks a class of a class-conditional model: "
      "needs model.num_classes > 0; leave it -1"
  )
  config = test_config.get_config()  # where they do something, they pass
  config.sampling.sampler, config.sampling.eta = "ddim", 0.5
  config.eval.interp_t = 100
  config_validation.validate(config, 2, 2)
  config.sampling.sampler, config.sampling.eta = "dpm_solver++", 0.0
  config.sampling.timestep_spacing, config.sampling.thresholding = "logsnr", True
  config_validation.validate(config, 2, 2)


def test_every_batch_the_devices_do_not_divide_is_named_at_once():
  config = test_config.get_config()
  config.training.batch_size, config.sampling.batch_size, config.eval.batch_size = 128, 256, 256
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate(config, 6, 6, "HINT")
  assert str(e.value) == (
      "config.training.batch_size=128, config.sampling.batch_size=256 and "
      "config.eval.batch_size=256 are invalid: each must be divisible by the number of devices "
      "(6); HINT"
  )
  # The largest count that divides them all: the default on a 6- or 12-core machine.
  fits = {n: config_validation.devices_that_fit(config, n) for n in (6, 12, 16, 7, 1)}
  assert fits == {6: 4, 12: 8, 16: 16, 7: 4, 1: 1}
  # 8 processes of 16 devices split 128 (the sampling and eval batches would take 32).
  assert config_validation.devices_that_fit(config, 48, num_processes=8) == 16
  config.training.grad_accum_steps = 8  # each device's share must split into 8
  assert config_validation.devices_that_fit(config, 16) == 16
  assert config_validation.devices_that_fit(config, 32) == 16


def test_the_default_cpu_device_count_divides_the_batches(monkeypatch):
  from ddpm_jax import host  # pylint: disable=g-import-not-at-top

  config = test_config.get_config()
  config.training.batch_size, config.sampling.batch_size, config.eval.batch_size = 128, 256, 256
  monkeypatch.setattr(os, "cpu_count", lambda: 6)
  assert host.default_cpu_devices(config) == 4
  monkeypatch.setattr(os, "cpu_count", lambda: 8)
  assert host.default_cpu_devices(config) == 8
  # host.setup on a 6-core machine (a fresh process: this one's devices are set up).
  code = (
      "import os\n"
      "from absl import flags, logging\n"
      "flags.FLAGS.mark_as_parsed()\n"
      "logging.set_verbosity(logging.INFO)\n"
      "os.cpu_count = lambda: 6\n"
      "from configs import test\n"
      "from ddpm_jax import host\n"
      "import jax\n"
      "config = test.get_config()\n"
      "config.training.batch_size, config.sampling.batch_size = 128, 256\n"
      "host.setup_logging()\n"
      "host.setup(config)\n"
      "print(jax.local_device_count())\n"
  )
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run(
      [sys.executable, "-c", code],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert r.stdout.strip() == "4", r.stderr[-3000:]
  assert (
      "Split over 4 CPU devices, not one per core (6), so that training.batch_size=128, "
      "sampling.batch_size=256 and eval.batch_size=16 divide evenly (--cpu_devices to choose)"
  ) in r.stderr, r.stderr[-3000:]
  # What the error about the batch sizes adds on a CPU (this process has 8 devices).
  config.sampling.batch_size = 12
  monkeypatch.setenv("XLA_FLAGS", "")
  assert host.device_hint(config) == (
      "choose the CPU device count with --cpu_devices: 4 divides every batch size"
  )
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert host.device_hint(config) == (
      "the CPU device count comes from XLA_FLAGS' --xla_force_host_platform_device_count: 4 "
      "would divide every batch size"
  )


def test_process_flags_that_do_nothing_or_cannot_fit_are_one_line():
  from ddpm_jax import host  # pylint: disable=g-import-not-at-top

  config = test_config.get_config()
  with pytest.raises(errors.DistributedError) as e:
    host.check_process_flags(config, None, 2, 0)
  assert str(e.value) == (
      "--num_processes=2 and --process_id=0 do nothing without --coordinator_address=HOST:PORT "
      "(or --config.distributed.initialize=True on a TPU pod or under SLURM)"
  )
  with pytest.raises(errors.DistributedError) as e:
    host.check_process_flags(config, "localhost:1234", 2, 2)
  assert str(e.value) == (
      "--process_id=2 is invalid: the 2 processes of --num_processes=2 are numbered 0..1"
  )
  host.check_process_flags(config, "localhost:1234", 2, 1)
  host.check_process_flags(config, None, None, None)
  # distributed.initialize outside a cluster: JAX's ValueError, as one line with what to do
  # (in a fresh process: this one's backend is up, which JAX refuses first).
  code = (
      "from ddpm_jax import errors, host\n"
      "try:\n"
      "  host._initialize_distributed(None, None, None, 60)\n"
      "except errors.DistributedError as e:\n"
      "  print(e)\n"
  )
  r = subprocess.run(
      [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert r.stdout.strip() == (
      "could not join the processes (ValueError: coordinator_address should be defined.); "
      "outside a TPU pod or SLURM, pass --coordinator_address=HOST:PORT --num_processes=N "
      "--process_id=I"
  ), r.stderr[-3000:]


def test_a_failed_run_leaves_no_workdir_it_created(tmp_path):
  from ddpm_jax import workdirs  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "a" / "b" / "run"
  created = workdirs.prepare(str(workdir))
  assert created == [str(tmp_path / "a"), str(tmp_path / "a" / "b"), str(workdir)]
  (workdir / "log.INFO").write_text("the failed run's log")
  (workdir / workdirs.LOCK_FILE).write_text("")
  workdirs.remove_created(created)
  assert os.listdir(tmp_path) == []  # the workdir and the parents it needed
  # A workdir that existed, or that holds anything besides the log, stays.
  assert workdirs.prepare(str(tmp_path)) == []
  created = workdirs.prepare(str(workdir))
  (workdir / "checkpoints").mkdir()
  (workdir / "checkpoints" / "x").write_text("")
  workdirs.remove_created(created)
  assert os.path.isfile(workdir / "checkpoints" / "x")


def test_orbax_read_only_notice_is_not_logged():
  from ddpm_jax import host  # pylint: disable=g-import-not-at-top

  make = lambda msg, level: logging.LogRecord("orbax", level, "/x/orbax/m.py", 1, msg, (), None)
  keep = host._OwnInfoOnly()  # pylint: disable=protected-access
  assert not keep.filter(make("Given directory is read only=%s", logging.WARNING))
  assert keep.filter(make("%s is read only, save will be skipped", logging.WARNING))


def _free_port():
  import socket  # pylint: disable=g-import-not-at-top

  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _wait_for(proc, log, text, timeout=300):
  import time  # pylint: disable=g-import-not-at-top

  deadline = time.time() + timeout
  while time.time() < deadline:
    with open(log) as f:
      if text in f.read():
        return
    assert proc.poll() is None, open(log).read()[-3000:]
    time.sleep(0.05)
  proc.kill()
  raise AssertionError(f"no {text!r} within {timeout} s")


def _popen(log, *args):
  with open(log, "w") as f:
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/test.py", *args],
        cwd=ROOT,
        env={**os.environ, **ENV},
        stdout=subprocess.DEVNULL,
        stderr=f,
    )


def _interrupt_expecting_one_line(proc, log: str) -> str:
  """Ctrl-C to ``proc``: status 130 and one ``error:`` line, no traceback. Returns its stderr."""
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=60) == 130
  err = open(log).read()
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert lines == ["error: stopped by SIGINT (Ctrl-C); no file was left half-written"], err
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  return err


@pytest.mark.slow
def test_cli_a_missing_process_is_waited_for_with_a_message_then_a_time_out(tmp_path):
  """No second process: the wait is announced, bounded, and ends in one line, status 1; a
  Ctrl-C while waiting (inside JAX's connect) ends it at once: one line, status 130."""
  port = _free_port()
  flags_ = (f"--coordinator_address=localhost:{port}", "--num_processes=2", "--process_id=0")
  rc, err = cli(*flags_, "--coordinator_timeout=3", workdir=str(tmp_path / "run"))
  assert f"Waiting for 1 more process to join the coordinator at localhost:{port} " in err
  assert_one_line_error(
      rc,
      err,
      f"error: 1 more process did not join the coordinator at localhost:{port} within 3 s "
      "(--coordinator_timeout); start every process with the same --coordinator_address and "
      "--num_processes, each with its own --process_id",
  )
  assert not os.path.exists(tmp_path / "run")

  log = str(tmp_path / "wait.log")
  proc = _popen(log, f"--workdir={tmp_path / 'run'}", *flags_)
  _wait_for(proc, log, "Waiting for 1 more process")
  _interrupt_expecting_one_line(proc, log)


@pytest.mark.slow
def test_cli_ctrl_c_while_sampling_is_one_line_and_status_130(tmp_path, host_state):
  workdir = str(tmp_path / "run")
  _save(workdir, host_state, 3)
  log = str(tmp_path / "sample.log")
  proc = _popen(
      log, f"--workdir={workdir}", "--mode=sample", "--config.sampling.num_samples=100000"
  )
  _wait_for(proc, log, "Sampling 100000 images")
  err = _interrupt_expecting_one_line(proc, log)
  assert "Given directory is read only" not in err  # orbax's notice, in every sampling run
  assert not glob.glob(os.path.join(workdir, "samples", "samples_*.npz"))
