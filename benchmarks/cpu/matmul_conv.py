"""3x3 convs with tiny outputs on CPU: XLA's convolution against one matrix product.

  python benchmarks/cpu/matmul_conv.py --shapes=64x2x2x64x64,64x4x4x128x128x2 [--reps=5]
  python benchmarks/cpu/matmul_conv.py --config=configs/digits.py [--config.model.ch=64]

``ddpm_jax.cpu.conv.conv3x3`` computes outputs of at most
``MAX_MATMUL_OUTPUT_PIXELS`` pixels as one matrix product of the nine shifted
copies of the input (``conv_as_matmul``). With --shapes
(``BxHxWxCinxCout[xStride]``, per device), the forward pass plus both gradients
of one 'SAME' conv is timed as XLA's convolution (``conv2d``) and as the
product. With --config, the real pmap-ed train step with
``model.cpu_kernels=True`` is compiled twice, ``MAX_MATMUL_OUTPUT_PIXELS``
being 0 (never) and its value while the step is traced. The programs are
called in turns in one process. Prints a line per program on stderr
(milliseconds per call, medians over the rounds, the speed-up) and one JSON line
on stdout.
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
flags.DEFINE_list("shapes", [], "BxHxWxCinxCout[xStride] conv shapes per device.")
flags.DEFINE_integer("reps", 5, "Timed rounds; each program runs --calls times per round.")
flags.DEFINE_integer("calls", 4, "Calls per program per round.")
flags.DEFINE_integer("cpu_devices", 0, "CPU host devices (0: one per core).")


def _train_step_programs(config):
  from unittest import mock  # pylint: disable=g-import-not-at-top
  from ddpm_jax.cpu import conv  # pylint: disable=g-import-not-at-top

  progs = {}
  for name, pixels in (("conv", 0), ("matmul", conv.MAX_MATMUL_OUTPUT_PIXELS)):
    # The library has no setting for it: the module constant is read when the step is traced.
    with mock.patch.object(conv, "MAX_MATMUL_OUTPUT_PIXELS", pixels):
      progs[name] = bench_setup.compiled_train_step(config)
  return progs


def _conv_programs(shape):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax.cpu import conv  # pylint: disable=g-import-not-at-top

  stride = shape[5] if len(shape) > 5 else 1
  x, kernel, _ = bench_setup.conv_operands(shape[:5])
  strides = (stride, stride)
  progs, outs = {}, {}
  for name, fn in (("conv", conv.conv2d), ("matmul", conv.conv_as_matmul)):

    def loss_and_grads(x, kernel, fn=fn):
      return jax.value_and_grad(
          lambda x, k: jnp.sum(fn(x, k, strides, "SAME") ** 2), argnums=(0, 1)
      )(x, kernel)

    compiled = jax.pmap(loss_and_grads).lower(x, kernel).compile()
    progs[name] = lambda compiled=compiled: compiled(x, kernel)
    outs[name] = progs[name]()
  for got, want in zip(jax.tree.leaves(outs["matmul"]), jax.tree.leaves(outs["conv"])):
    err = float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max())
    if err > 1e-4:  # the same convolution up to rounding
      raise AssertionError(f"{shape}: the matrix product differs from the conv by {err:.2e}")
  return progs


def main(argv):
  del argv
  config = bench_setup.config_with_cpu_kernels_or_cores(FLAGS.config, FLAGS.cpu_devices)
  cases = {}
  if config is not None:
    cases["train_step"] = _train_step_programs(config)
  for s in FLAGS.shapes:
    cases[s] = _conv_programs(tuple(int(v) for v in s.split("x")))
  if not cases:
    raise app.UsageError("give --config or --shapes")
  results = {}
  for case, progs in cases.items():
    ms = bench_setup.time_against_baselines(progs, lambda n: "conv", FLAGS.reps, FLAGS.calls, case)
    results[case] = {
        **{n: round(v, 3) for n, v in ms.items()},
        "speedup": round(ms["conv"] / ms["matmul"], 3),
    }
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main)
