"""main.py as a user runs it: exit status 1, exactly one ``error: ...`` line on stderr, no traceback.

Config files and overrides, workdirs and their run record, full disks, process
flags, a missing process, Ctrl-C. Each case runs main.py in a subprocess
(tests/helpers.py) unless the check is cheaper in this process.
"""

import errno
import glob
import json
import os
import re
import signal
import subprocess

import numpy as np
import pytest

from configs import test as test_config
from ddpm_jax import errors
from helpers import assert_one_line_error, cli, complete_steps, save_checkpoint, start_main
from helpers import run_python, wait_for_line, write_images

IMAGE_EXTS = ".png, .jpg, .jpeg, .webp, .bmp"


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
  write_images(folder, good=0, bad=2)
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
  save_checkpoint(workdir, host_state, 3)
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
  r = run_python(code, env)
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
  r = run_python(code, dict(os.environ))
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


def _free_port():
  import socket  # pylint: disable=g-import-not-at-top

  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


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
  proc = start_main(log, f"--workdir={tmp_path / 'run'}", *flags_, stdout_too=False)
  wait_for_line(proc, log, "Waiting for 1 more process")
  _interrupt_expecting_one_line(proc, log)


@pytest.mark.slow
def test_cli_ctrl_c_while_sampling_is_one_line_and_status_130(tmp_path, host_state):
  workdir = str(tmp_path / "run")
  save_checkpoint(workdir, host_state, 3)
  log = str(tmp_path / "sample.log")
  proc = start_main(
      log,
      f"--workdir={workdir}",
      "--mode=sample",
      "--config.sampling.num_samples=100000",
      stdout_too=False,
  )
  wait_for_line(proc, log, "Sampling 100000 images")
  err = _interrupt_expecting_one_line(proc, log)
  assert "Given directory is read only" not in err  # orbax's notice, in every sampling run
  assert not glob.glob(os.path.join(workdir, "samples", "samples_*.npz"))
