"""Winograd's kernel transform G g G^T as one [36, 9] matrix product against two separable passes.

  python benchmarks/cpu/winograd_kernel_transform.py --config=configs/cifar10.py \
      --config.training.batch_size=8 [--reps=3] [--calls=2]
  python benchmarks/cpu/winograd_kernel_transform.py --kernels=128x128,512x256

``ddpm_jax/cpu/winograd.py`` transforms every 3x3 kernel [3, 3, Cin, Cout] into its
36 components [36, Cin, Cout] (and back, for the gradient) with one matrix
product by ``winograd.KERNEL_MATRIX``. The formulation it replaced, kept here
as the baseline, applied G along one kernel axis and then the other, as
separable sums of the kernel's rows, writing a [6, 3, Cin, Cout] intermediate.
With --config, the real train step with ``model.cpu_kernels=True`` (which uses
Winograd from 32 + 64 channels at 16x16) is compiled with each formulation patched
into ``winograd`` (read at trace time) and the two programs are called in turns
in one process. With --kernels (``CinxCout``), the forward transform and its
transpose alone, on every device at once. Prints milliseconds per call (medians)
and speed-ups on stderr, one JSON line on stdout.
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
config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
flags.DEFINE_list("kernels", [], "CinxCout kernel shapes (instead of --config).")
flags.DEFINE_integer("reps", 3, "Timed rounds; each program runs --calls times per round.")
flags.DEFINE_integer("calls", 2, "Calls per program per round.")
flags.DEFINE_integer("cpu_devices", 0, "CPU host devices (0: one per core).")


def _separable():
  """(transform, transpose) as two passes of sums over kernel rows, then columns."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ddpm_jax.cpu import winograd  # pylint: disable=g-import-not-at-top

  combine = winograd._combine  # pylint: disable=protected-access  # the tiles' separable sums

  def transform(kernel):
    rows = jnp.stack(combine(winograd.G, [kernel[r] for r in range(3)]))  # [6 (i), 3, Cin, Cout]
    u = jnp.stack(combine(winograd.G, [rows[:, s] for s in range(3)]))  # [6 (j), 6 (i), Cin, Cout]
    return u.reshape((36,) + kernel.shape[2:])

  def transpose(du):
    du = du.reshape((6, 6) + du.shape[1:])
    cols = combine(winograd.G.T, [du[j] for j in range(6)])  # 3 (s) x [6 (i), Cin, Cout]
    return jnp.stack(
        [jnp.stack(combine(winograd.G.T, [c[i] for i in range(6)])) for c in cols], axis=1
    )  # [3 (r), 3 (s), Cin, Cout]

  return transform, transpose


def main(argv):
  del argv
  config = bench_setup.config_with_cpu_kernels_or_cores(FLAGS.config, FLAGS.cpu_devices)
  from unittest import mock  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax.cpu import winograd  # pylint: disable=g-import-not-at-top

  ways = {
      "separable": _separable(),
      "matrix": (winograd.kernel_transform, winograd.kernel_transform_transpose),
  }
  cases = {}
  if config is not None:
    if config.data.image_size < winograd.MIN_SIDE:
      print(
          f"note: {config.data.image_size}x{config.data.image_size} images: no conv uses "
          "Winograd, the two programs are the same",
          file=sys.stderr,
      )
    progs = {}
    for name, (transform, transpose) in ways.items():
      with mock.patch.multiple(
          winograd, kernel_transform=transform, kernel_transform_transpose=transpose
      ):
        progs[name] = bench_setup.compiled_train_step(config)
    cases["train step"] = progs
  for text in FLAGS.kernels:
    c_in, c_out = (int(v) for v in text.split("x"))
    _, kernel, _ = bench_setup.conv_operands((1, 4, 4, c_in, c_out))
    du = jax.pmap(winograd.kernel_transform)(kernel)
    want = np.asarray(du)
    progs = {}
    for name, (transform, transpose) in ways.items():
      fwd = jax.pmap(transform).lower(kernel).compile()
      bwd = jax.pmap(transpose).lower(du).compile()
      np.testing.assert_allclose(np.asarray(fwd(kernel)), want, rtol=1e-5, atol=1e-6)
      progs[f"{name} transform"] = lambda fwd=fwd, k=kernel: fwd(k)
      progs[f"{name} transpose"] = lambda bwd=bwd, d=du: bwd(d)
    cases[text] = progs
  if not cases:
    raise app.UsageError("give --config or --kernels")
  results = {}
  for case, progs in cases.items():
    ms = bench_setup.time_against_baselines(
        progs, lambda n: n.replace("matrix", "separable"), FLAGS.reps, FLAGS.calls, case
    )
    results[case] = {n: round(v, 3) for n, v in ms.items()}
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main)
