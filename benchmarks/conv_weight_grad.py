"""Chunked conv weight gradients on CPU: the train step, or single convs, at several chunk budgets.

  python benchmarks/conv_weight_grad.py --config=configs/cifar10.py \
      --config.training.batch_size=8 [--budgets=0,1048576] [--reps=4] [--calls=2]
  python benchmarks/conv_weight_grad.py --shapes=4x32x32x128x128,16x16x16x64x64 [--budgets=...]

``ddpm_jax.models.conv`` sums a convolution's weight gradient over batch chunks
of at most ``CPU_WEIGHT_GRAD_CHUNK_BYTES`` per operand; budget 0 is XLA's own
single convolution. With --config, the real pmap-ed train step is compiled once
per budget and the programs are called in turns in one process (so a slow
spell of the host hits all of them alike); with --shapes (``BxHxWxCinxCout``),
only the weight gradient of one 3x3 'SAME' conv per device is timed. Prints a
line per budget on stderr (milliseconds per call, medians over the rounds, and
the speed-up over budget 0) and one JSON line on stdout.
"""

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_setup  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config (the train step).",
                                lock_config=True)
flags.DEFINE_list("shapes", [], "BxHxWxCinxCout conv shapes per device (instead of --config).")
flags.DEFINE_list("budgets", ["0", str(1 << 19)], "Chunk budgets in bytes (0: no chunks).")
flags.DEFINE_integer("reps", 4, "Timed rounds; each program runs --calls times per round.")
flags.DEFINE_integer("calls", 2, "Calls per program per round.")
flags.DEFINE_integer("cpu_devices", 0, "CPU host devices (0: one per core).")


def _train_step_programs(config, budgets):
  from ddpm_jax.models import conv  # pylint: disable=g-import-not-at-top
  progs = {}
  for budget in budgets:
    conv.CPU_WEIGHT_GRAD_CHUNK_BYTES = budget  # read when the step is traced below
    progs[budget] = bench_setup.compiled_train_step(config)
  return progs


def _conv_programs(shape, budgets):
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax.models import conv  # pylint: disable=g-import-not-at-top
  x, kernel, dy = bench_setup.conv_operands(shape)  # the weight gradient ignores kernel values
  progs = {}
  for budget in budgets:
    conv.CPU_WEIGHT_GRAD_CHUNK_BYTES = budget

    def grad(x, kernel, dy):
      return jax.vjp(lambda k: conv.conv2d(x, k, (1, 1), "SAME"), kernel)[1](dy)[0]
    compiled = jax.pmap(grad).lower(x, kernel, dy).compile()
    progs[budget] = lambda compiled=compiled: compiled(x, kernel, dy)
  return progs


def main(argv):
  del argv
  bench_setup.use_all_cores(FLAGS.cpu_devices)
  import jax  # pylint: disable=g-import-not-at-top
  budgets = [int(b) for b in FLAGS.budgets]
  if 0 not in budgets:
    budgets = [0] + budgets
  cases = {}
  if FLAGS.config is not None:
    cases["train_step"] = _train_step_programs(FLAGS.config, budgets)
  for s in FLAGS.shapes:
    cases[s] = _conv_programs(tuple(int(v) for v in s.split("x")), budgets)
  if not cases:
    raise app.UsageError("give --config or --shapes")
  results = {}
  for case, progs in cases.items():
    for fn in progs.values():  # compiled already; one untimed call each
      jax.block_until_ready(fn())
    medians = bench_setup.median_ms_alternating({b: {"call": fn} for b, fn in progs.items()},
                                                (), FLAGS.reps, FLAGS.calls)
    ms = {b: medians[f"{b}_call_ms"] for b in progs}
    results[case] = {str(b): round(v, 2) for b, v in ms.items()}
    for b, v in ms.items():
      print(f"{case:>22} budget {b:>8}: {v:9.1f} ms per call, {ms[0] / v:5.2f}x", file=sys.stderr)
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main)
