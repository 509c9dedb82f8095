"""The real train step with one config field set two (or more) ways, timed in turns in one process.

  python benchmarks/config_ab.py --config=configs/cifar10.py \
      --config.training.batch_size=8 --field=model.remat \
      --values=False,True [--reps=3] [--calls=2]

Builds and compiles the pmap-ed train step (``bench_setup.compiled_train_step``)
once per value of ``--field``, then calls the programs in turns, ``--calls``
times each per round, and reports the median milliseconds per call of each and
its speed-up over the first value. Programs built in one process share the
host's state of the moment, so a difference of a few percent can be seen on a
noisy machine where runs one after another cannot resolve it. Values are
parsed as Python literals (``True``, ``4``, ``'scan'``), else kept as strings.
The process is set up for --config as given (``ddpm_jax.host.setup``; e.g.
--config.model.cpu_kernels=True has glibc keep freed memory for all programs),
so ``--field=model.cpu_kernels --values=False,True`` compares the plain model
with the CPU kernels under one allocator setting.
Prints a table on stderr and one JSON line on stdout.
"""

import ast
import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_setup  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
flags.DEFINE_string("field", None, "The config field to vary, e.g. model.remat.")
flags.DEFINE_list("values", None, "Its values, the first being the baseline.")
flags.DEFINE_integer("reps", 3, "Timed rounds; each program runs --calls times per round.")
flags.DEFINE_integer("calls", 2, "Calls per program per round.")
flags.DEFINE_integer("cpu_devices", 0, "CPU host devices (0: one per core).")
flags.mark_flags_as_required(["config", "field", "values"])


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def main(argv):
  del argv
  bench_setup.setup(FLAGS.config, FLAGS.cpu_devices)
  import jax  # pylint: disable=g-import-not-at-top

  section, _, name = FLAGS.field.partition(".")
  if section not in FLAGS.config or not name or name not in FLAGS.config[section]:
    raise app.UsageError(f"--field={FLAGS.field}: no such config field (section.name)")
  progs = {}
  for text in FLAGS.values:
    config = FLAGS.config.copy_and_resolve_references()
    with config.unlocked():
      config[section][name] = _literal(text)
    progs[text] = bench_setup.compiled_train_step(config)
  ms = bench_setup.time_against_baselines(
      progs, lambda v: FLAGS.values[0], FLAGS.reps, FLAGS.calls, FLAGS.field
  )
  base = ms[FLAGS.values[0]]
  print(
      json.dumps(
          dict(
              field=FLAGS.field,
              devices=jax.local_device_count(),
              ms={v: round(t, 2) for v, t in ms.items()},
              speedup={v: round(base / t, 3) for v, t in ms.items()},
          )
      )
  )


if __name__ == "__main__":
  app.run(main)
