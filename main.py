"""ddpm-jax: train, sample and evaluate DDPMs.

  python main.py --config=configs/digits.py --workdir=/tmp/digits            # train
  python main.py --config=configs/digits.py --workdir=/tmp/digits --mode=sample
  python main.py --config=configs/cifar10.py --workdir=DIR --config.training.batch_size=64

Any config field can be overridden with --config.SECTION.FIELD=VALUE.
"""

import json
import os
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


def _setup_devices(config) -> None:
  """Multi-host initialisation and the CPU device count, before JAX touches a device."""
  import jax  # pylint: disable=g-import-not-at-top
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in xla_flags:
    jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices or os.cpu_count() or 1)
  if "collective_call_terminate_timeout" not in xla_flags:
    # CPU all-reduces abort after 40 s by default, which a busy CPU host can exceed.
    os.environ["XLA_FLAGS"] = (xla_flags + " --xla_cpu_collective_call_terminate_timeout_seconds=3600").strip()
  if config.distributed.initialize or FLAGS.coordinator_address:
    if FLAGS.coordinator_address:  # e.g. several CPU processes on one machine
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # On TPU pods and SLURM/Kubernetes GPU clusters the arguments are auto-detected.
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)


def _run(config, workdir: str, mode: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax import config_validation  # pylint: disable=g-import-not-at-top
  config_validation.validate(config, jax.device_count(), jax.local_device_count())
  os.makedirs(workdir, exist_ok=True)
  if not os.access(workdir, os.W_OK):
    raise PermissionError(f"--workdir={workdir} is not writable")
  if jax.process_index() == 0:
    logging.get_absl_handler().use_absl_log_file("log", workdir)
    with open(os.path.join(workdir, f"config_{mode}.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  logging.info("JAX %s: %d processes, %d devices (%s)", jax.__version__, jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS.alsologtostderr = True
  logging.get_absl_handler().addFilter(_DropLibraryChatter())
  config = FLAGS.config
  _setup_devices(config)
  # Errors a user can fix get one line, not a traceback.
  from ddpm_jax import checkpoint, config_validation, input_pipeline, train  # pylint: disable=g-import-not-at-top
  user_errors = (config_validation.ConfigError, checkpoint.CheckpointMismatchError,
                 input_pipeline.DatasetNotPreparedError, train.NonFiniteError,
                 FileNotFoundError, PermissionError)
  try:
    _run(config, FLAGS.workdir, FLAGS.mode)
  except user_errors as e:
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
