"""Chunked conv weight gradients on CPU: single convs, or the train step, at several chunk budgets.

  python benchmarks/cpu/conv_weight_grad.py --shapes=4x32x32x128x128,16x16x16x64x64 [--budgets=...]
  python benchmarks/cpu/conv_weight_grad.py --config=configs/cifar10.py \
      --config.training.batch_size=8 [--budgets=0,1048576] [--reps=4] [--calls=2]

``ddpm_jax.cpu.conv`` sums a convolution's weight gradient over batch chunks of
at most ``budget`` bytes per operand (``weight_grad_chunk``; the model uses
``WEIGHT_GRAD_CHUNK_BYTES``); budget 0 is XLA's own single convolution. With
--shapes (``BxHxWxCinxCout``), the weight gradient of one 3x3 'SAME' conv per
device is timed, each budget passed as ``weight_grad_chunk``'s ``budget``. With
--config, the real pmap-ed train step with ``model.cpu_kernels=True`` is
compiled once per budget, ``cpu.conv.WEIGHT_GRAD_CHUNK_BYTES`` being set to it
while the step is traced (the convs Winograd computes are not chunked either
way). The programs are called in turns in one process (so a slow spell of the
host hits all of them alike). Prints a line per budget on stderr (milliseconds
per call, medians over the rounds, and the speed-up over budget 0) and one JSON
line on stdout.
"""

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import bench_setup  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config (the train step).", lock_config=True
)
flags.DEFINE_list("shapes", [], "BxHxWxCinxCout conv shapes per device (instead of --config).")
flags.DEFINE_list("budgets", ["0", str(1 << 19)], "Chunk budgets in bytes (0: no chunks).")
flags.DEFINE_integer("reps", 4, "Timed rounds; each program runs --calls times per round.")
flags.DEFINE_integer("calls", 2, "Calls per program per round.")
flags.DEFINE_integer("cpu_devices", 0, "CPU host devices (0: one per core).")


def _train_step_programs(config, budgets):
  from unittest import mock  # pylint: disable=g-import-not-at-top
  from ddpm_jax.cpu import conv  # pylint: disable=g-import-not-at-top

  progs = {}
  for budget in budgets:
    # The library has no budget setting: its module constant is read when the step is traced.
    with mock.patch.object(conv, "WEIGHT_GRAD_CHUNK_BYTES", budget):
      progs[budget] = bench_setup.compiled_train_step(config)
  return progs


def _conv_programs(shape, budgets):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax.cpu import conv  # pylint: disable=g-import-not-at-top

  x, kernel, dy = bench_setup.conv_operands(shape)  # the weight gradient ignores kernel values
  progs = {}
  for budget in budgets:
    chunk = conv.weight_grad_chunk(shape[:4], shape[4], x.dtype.itemsize, budget=budget)

    def grad(x, kernel, dy, chunk=chunk):
      if chunk < x.shape[0]:
        return conv.chunked_weight_grad(x, dy, kernel, (1, 1), "SAME", chunk)

      def plain(k):
        return jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=conv.DIMENSION_NUMBERS
        )

      return jax.vjp(plain, kernel)[1](dy)[0]

    compiled = jax.pmap(grad).lower(x, kernel, dy).compile()
    progs[budget] = lambda compiled=compiled: compiled(x, kernel, dy)
    got, want = np.asarray(progs[budget]()), np.asarray(progs[budgets[0]]())
    err = np.abs(got - want).max() / np.abs(want).max()
    if err > 1e-4:  # the chunks' sum equals XLA's single convolution up to rounding
      raise AssertionError(f"{shape}: budget {budget} differs from {budgets[0]}: {err:.2e}")
    print(f"{'x'.join(map(str, shape)):>22} budget {budget:>8}: chunks of {chunk}", file=sys.stderr)
  return progs


def main(argv):
  del argv
  config = bench_setup.config_with_cpu_kernels_or_cores(FLAGS.config, FLAGS.cpu_devices)
  import jax  # pylint: disable=g-import-not-at-top

  budgets = [int(b) for b in FLAGS.budgets]
  if 0 not in budgets:
    budgets = [0] + budgets
  cases = {}
  if config is not None:
    cases["train_step"] = _train_step_programs(config, budgets)
  for s in FLAGS.shapes:
    cases[s] = _conv_programs(tuple(int(v) for v in s.split("x")), budgets)
  if not cases:
    raise app.UsageError("give --config or --shapes")
  results = {}
  for case, progs in cases.items():
    for fn in progs.values():  # compiled already; one untimed call each
      jax.block_until_ready(fn())
    medians = bench_setup.median_ms_alternating(
        {b: {"call": fn} for b, fn in progs.items()}, (), FLAGS.reps, FLAGS.calls
    )
    ms = {b: medians[f"{b}_call_ms"] for b in progs}
    results[case] = {str(b): round(v, 2) for b, v in ms.items()}
    for b, v in ms.items():
      print(f"{case:>22} budget {b:>8}: {v:9.1f} ms per call, {ms[0] / v:5.2f}x", file=sys.stderr)
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main)
