"""ddpm-jax: train, sample and evaluate DDPMs, or compile them for a TPU slice (--mode).

  python main.py --config=configs/digits.py --workdir=/tmp/digits                # train
  python main.py --config=configs/digits.py --workdir=/tmp/digits --mode=sample

Any config field can be overridden with --config.SECTION.FIELD=VALUE.
"""

import os
import signal

# Ctrl-C while the imports below load (seconds): one line, not a traceback.
signal.signal(signal.SIGINT, lambda *_: (os.write(2, b"error: stopped by SIGINT\n"), os._exit(130)))
from absl import app
from absl import flags
import jax

from ddpm_jax import compile_check, config_loading, config_validation, errors, host, sample, workdirs
from ddpm_jax.evaluation import bpd, fid, figures
from ddpm_jax.training import loop

MODES = {
    "train": loop.train_and_evaluate,
    "sample": sample.run_sample,
    "eval_bpd": bpd.run_eval_bpd,
    "eval_fid": fid.run_eval_fid,
    "figures": figures.run_figures,
    "compile": lambda config, workdir: compile_check.run_compile(config, workdir, FLAGS.topology),
}
FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Experiment config file (configs/*.py).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, summaries and samples.")
flags.DEFINE_enum("mode", "train", list(MODES), "What to run.")
flags.DEFINE_integer("cpu_devices", 0, "CPU devices (0: one per core that fits).", lower_bound=0)
flags.DEFINE_string("coordinator_address", None, "Multi-host without auto-detection: host:port.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.", lower_bound=1)
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.", lower_bound=0)
flags.DEFINE_integer("coordinator_timeout", 300, "Multi-host: seconds to wait.", lower_bound=1)
flags.DEFINE_string("topology", None, "--mode=compile: the TPU slice, e.g. v3-8, v5e-16, v4:2x2x1.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl's flags; the --config.* overrides are passed on to main. Mistakes are one line."""
  overrides = [a for a in argv[1:] if a.startswith(config_loading.OVERRIDE_PREFIX)]
  try:
    rest = FLAGS([a for a in argv if a not in overrides])
  except flags.Error as e:
    host.fail(f"{e} (see --helpfull)")
  if len(rest) > 1:
    host.fail(f"unexpected argument {rest[1]!r} (flags are --name=value; see --helpfull)")
  return rest + overrides


def main(argv):
  host.setup_logging()
  signals, created = host.SignalWatcher().install(), []  # a signal: one line, 128 + signum
  signals.at_exit.append(lambda: workdirs.remove_created(created))
  try:
    config = config_loading.load(FLAGS.config, argv[1:])
    process = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    devices = (  # a compile is checked against the slice's devices, not this host's
        compile_check.slice_device_counts(FLAGS.topology)
        if FLAGS.mode == "compile"
        else host.setup(config, FLAGS.cpu_devices, *process, FLAGS.coordinator_timeout)
    )
    config_validation.validate(config, *devices)
    created += workdirs.prepare(FLAGS.workdir)
    if jax.process_index() == 0:
      host.setup_logging(FLAGS.workdir)
      if FLAGS.mode == "train":  # held until the process ends
        workdirs.Lock(FLAGS.workdir).acquire()
    MODES[FLAGS.mode](config, FLAGS.workdir)
  except errors.UserError as e:
    workdirs.remove_created(created)
    host.fail(e, log=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
