"""ddpm-jax: train, sample and evaluate DDPMs.

  python main.py --config=configs/digits.py --workdir=/tmp/digits            # train
  python main.py --config=configs/digits.py --workdir=/tmp/digits --mode=sample
  python main.py --config=configs/cifar10.py --workdir=DIR --config.training.batch_size=64

Any config field can be overridden with --config.SECTION.FIELD=VALUE.
"""

import json
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, summaries and samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval_bpd", "eval_fid", "figures"],
                  "train: train (resuming from workdir); sample: write samples of the EMA "
                  "parameters; eval_bpd: bits/dim on data.eval_split; eval_fid: FID and "
                  "Inception Score of samples; figures: the paper's progressive generation "
                  "and interpolation figures.")
flags.DEFINE_integer("cpu_devices", 0, "On a CPU host, how many JAX devices to split the batch "
                     "over (0: one per core). Ignored on GPU/TPU.")
flags.DEFINE_string("coordinator_address", None, "Multi-host without auto-detection: host:port "
                    "of process 0 (then also --num_processes and --process_id).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def _multi_process(config) -> bool:
  return bool(config.distributed.initialize or FLAGS.coordinator_address)


def _setup_devices(config) -> None:
  """The CPU device count, the allocator and multi-host initialisation, before JAX touches a device.

  A single-process CPU run is restarted here, once, with ``config.host.malloc``
  (``ddpm_jax/host_malloc.py``); nothing has been written by then. Multi-process
  runs keep the allocator they were started with: a restart after
  ``jax.distributed.initialize`` would break the other processes' rendezvous.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax import config_validation, host_malloc  # pylint: disable=g-import-not-at-top
  config_validation.validate_host(config)
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in xla_flags:
    jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices or os.cpu_count() or 1)
  if "collective_call_terminate_timeout" not in xla_flags:
    # CPU all-reduces abort after 40 s by default, which a busy CPU host can exceed.
    os.environ["XLA_FLAGS"] = (xla_flags + " --xla_cpu_collective_call_terminate_timeout_seconds=3600").strip()
  if not _multi_process(config) and config.host.malloc != "system":
    if jax.default_backend() == "cpu":  # starts JAX's backends (the CPU one: milliseconds)
      host_malloc.relaunch_if_needed(config.host.malloc)  # returns only if nothing changes
  if _multi_process(config):
    if FLAGS.coordinator_address:  # e.g. several CPU processes on one machine
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # On TPU pods and SLURM/Kubernetes GPU clusters the arguments are auto-detected.
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)


class UserError(Exception):
  """A problem the user can fix; main() prints its message as one line."""


def _fail(message: str) -> None:
  """The one-line ``error: ...`` on stderr, exit status 1."""
  print("error: " + " ".join(str(message).split()), file=sys.stderr)
  sys.exit(1)


def _parse_flags(argv):
  """absl's flag parsing, with every command-line mistake reported as one line.

  A misspelled config field (--config.training.batchsize=3) makes
  ml_collections raise AttributeError/KeyError out of the parser, and a config
  file that cannot be loaded only fails on first use: both would be tracebacks.
  """
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e} (see --helpfull)")
  except (AttributeError, KeyError) as e:
    message = _unknown_field_message(e, argv)
    if message is None:
      raise  # not an override naming a missing field: a bug in a config file, say
    _fail(message)
  try:
    FLAGS.config.keys()  # ml_collections defers a file that failed to load to here
  except OSError as e:
    cause = e.__cause__ or e
    reason = str(cause).strip().splitlines()[-1].strip() if str(cause).strip() else str(cause)
    _fail(f"--config={FLAGS['config'].config_filename}: cannot load the config file ({reason})")
  return rest


def _unknown_field_message(error: BaseException, argv):
  """'--config.training.batchsize: the config has no field ...' from ml_collections' KeyError.

  None when the error does not come from an override naming a missing field.
  """
  text = error
  while isinstance(text, BaseException) and text.args:
    text = text.args[0]  # AttributeError(KeyError("'batchsize'\nDid you mean ..."))
  text = str(text)
  key = re.match(r"""['"]?([\w-]+)""", text)
  key = key.group(1) if key else text.splitlines()[0]
  hint = re.search(r'Did you mean "([\w-]+)" instead of', text)
  flag = next((a.split("=", 1)[0] for a in argv[1:]
               if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")), None)
  if flag is None:
    return f"unknown config field {key!r} (did you mean {hint.group(1)!r}?)" if hint else None
  path = flag[len("--config."):].split(".")
  message = f"{flag}: the config has no field {'.'.join(path)!r}"
  if hint:
    path[path.index(key)] = hint.group(1)
    message += f" (did you mean --config.{'.'.join(path)}?)"
  return message + "; the fields are listed in configs/default.py"


def _quiet_closed_event_loop_noise() -> None:
  """Drops the 'Event loop is closed' RuntimeErrors orbax/tensorstore leave behind.

  After a failed checkpoint read or write, tensorstore completes its futures on
  an asyncio loop orbax has already closed; each completion prints a traceback
  through sys.unraisablehook (hundreds of them). They carry no information.
  """
  previous = sys.unraisablehook

  def hook(unraisable):
    if (isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"):
      return
    previous(unraisable)
  sys.unraisablehook = hook


def _prepare_workdir(workdir: str) -> None:
  """Creates ``workdir``; a path that cannot be a writable directory is a UserError."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir} is a file, not a directory")
  parent = os.path.dirname(os.path.abspath(workdir))
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if parent and not os.path.isdir(parent):
    raise UserError(f"--workdir={workdir} cannot be created: {parent} is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"--workdir={workdir} cannot be created: {e.strerror or e}") from e
  if not os.access(workdir, os.W_OK):
    raise UserError(f"--workdir={workdir} is not writable")


def _preflight_data(config, mode: str) -> None:
  """A TFDS data set that is not on disk fails before the model is built and compiled."""
  from ddpm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  if mode in ("train", "eval_bpd") and config.data.dataset in input_pipeline.TFDS_DATASETS:
    input_pipeline.get_tfds_builder(config.data)  # raises DatasetNotPreparedError


def _run(config, workdir: str, mode: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax import config_validation, host_malloc  # pylint: disable=g-import-not-at-top
  config_validation.validate(config, jax.device_count(), jax.local_device_count())
  _prepare_workdir(workdir)
  _preflight_data(config, mode)
  if jax.process_index() == 0:
    logging.get_absl_handler().use_absl_log_file("log", workdir)
    with open(os.path.join(workdir, f"config_{mode}.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  logging.info("JAX %s: %d processes, %d devices (%s), C allocator: %s", jax.__version__,
               jax.process_count(), jax.device_count(), jax.devices()[0].platform,
               host_malloc.describe())
  if mode == "train":
    from ddpm_jax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, workdir)
  elif mode == "sample":
    from ddpm_jax import generate  # pylint: disable=g-import-not-at-top
    generate.run_sample(config, workdir)
  else:
    from ddpm_jax import evaluate  # pylint: disable=g-import-not-at-top
    result = getattr(evaluate, f"run_{mode}")(config, workdir)
    logging.info("%s: %s", mode, json.dumps(result))


class _DropLibraryChatter(logging.logging.Filter):
  """Keeps orbax's and TF's per-file INFO lines out of the console and the log."""

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or not any(
        part in record.pathname for part in ("/orbax/", "/tensorflow/", "/jax/_src/"))


class _OneLineLibraryErrors(logging.logging.Filter):
  """Folds the tracebacks orbax and asyncio log from background threads into one line.

  A failed asynchronous checkpoint write (e.g. a full disk) is logged by orbax's
  writer thread and again by asyncio ("Future exception was never retrieved"),
  each with a traceback, before the same error reaches the main thread, which
  reports it: one line for a problem the user can fix, the full traceback for
  anything else.
  """

  def filter(self, record):
    if record.exc_info and any(part in record.pathname for part in ("/orbax/", "/asyncio/")):
      error = record.exc_info[1]
      message = " ".join(record.getMessage().split("\n")[0].split())
      detail = (str(error).splitlines() or [""])[0] if error is not None else ""
      if detail and detail not in message:
        message += f" ({type(error).__name__}: {detail})"
      record.msg, record.args, record.exc_info, record.exc_text = message, (), None, None
    return True


def _raised_in(error: BaseException, module_file: str) -> bool:
  """Whether ``error`` was raised by code in ``module_file`` (its innermost frame)."""
  tb = error.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and (os.path.realpath(tb.tb_frame.f_code.co_filename)
                             == os.path.realpath(module_file))


def _user_error_message(error: BaseException, workdir: str):
  """The one-line message of an error the user can fix, or None for a bug (traceback)."""
  from ddpm_jax import checkpoint, config_validation, input_pipeline, train  # pylint: disable=g-import-not-at-top
  user_errors = (UserError, config_validation.ConfigError, checkpoint.CheckpointMismatchError,
                 checkpoint.CheckpointWriteError, checkpoint.CorruptCheckpointError,
                 input_pipeline.DatasetNotPreparedError, train.NonFiniteError,
                 FileNotFoundError, PermissionError)
  if isinstance(error, user_errors):
    return str(error)
  storage = checkpoint.storage_error_message(error, checkpoint.checkpoint_dir(workdir),
                                             where=f"--workdir={workdir}")
  if storage is not None:
    return storage
  # The input pipeline checks data.* and the files it reads with ValueError (unknown
  # dataset, channels, a folder without decodable images, an empty split, ...).
  if isinstance(error, ValueError) and _raised_in(error, input_pipeline.__file__):
    return str(error)
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS.alsologtostderr = True
  logging.get_absl_handler().addFilter(_DropLibraryChatter())
  logging.get_absl_handler().addFilter(_OneLineLibraryErrors())
  _quiet_closed_event_loop_noise()
  config = FLAGS.config
  # Errors a user can fix get one line, not a traceback.
  try:
    _setup_devices(config)
    _run(config, FLAGS.workdir, FLAGS.mode)
  except Exception as e:  # pylint: disable=broad-except
    message = _user_error_message(e, FLAGS.workdir)
    if message is None:
      raise
    logging.error("%s: %s", type(e).__name__, message)
    # A failed asynchronous checkpoint write can leave a future whose error asyncio
    # logs only when it is garbage-collected at interpreter exit, after the log file
    # is closed; logging would then print its own traceback ("I/O operation on
    # closed file"). The error is reported above, so such late records are dropped.
    logging.logging.raiseExceptions = False
    _fail(message)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
