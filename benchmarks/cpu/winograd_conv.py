"""Winograd F(4x4, 3x3) and the CPU kernels against XLA's convolutions: train step, forward, convs.

  python benchmarks/cpu/winograd_conv.py --config=configs/cifar10.py \
      --config.training.batch_size=8 [--what=train|forward] [--reps=4] [--calls=2]
  python benchmarks/cpu/winograd_conv.py --shapes=4x32x32x128x128,16x16x16x64x64

With --config, the real pmap-ed train step (or, with --what=forward, one
network forward at ``sampling.batch_size``, compiled as the samplers compile it)
is built three ways and the programs are called in turns in one process:
``plain`` (``model.cpu_kernels=False``: Flax's convs and the rest of the plain
model), ``cpu_kernels_xla`` (``model.cpu_kernels=True`` with
``ddpm_jax.cpu.winograd.applies`` patched to False while tracing, so every 3x3
conv is ``cpu.conv.conv2d``: XLA's forward with the chunked weight gradient) and
``cpu_kernels`` (``model.cpu_kernels=True``: Winograd where ``winograd.applies``,
>= 32 + 64 channels at >= 16x16). Speed-ups are over ``plain``; ``cpu_kernels`` over
``cpu_kernels_xla`` is Winograd's share. The process is set up for --config as given (with
--config.model.cpu_kernels=True glibc keeps freed memory, as in main.py).

With --shapes (``BxHxWxCinxCout`` per device), one 3x3 'SAME' conv's forward,
and its forward plus both gradients, are timed on every device at once as
``xla`` (``lax.conv_general_dilated``), ``cpu_conv3x3`` (``cpu.conv.conv3x3``:
Winograd where it applies, else the chunked ``conv2d``) and ``winograd``
(``cpu.winograd.conv3x3`` whether or not the rule picks it; needs H and W
multiples of 4). Speed-ups are over ``xla``. Prints milliseconds per call
(medians over the rounds) and the speed-up on stderr, and one JSON line on
stdout (with each shape's ``winograd_applies`` and forward errors relative to
``xla``).
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
flags.DEFINE_enum(
    "what",
    "train",
    ["train", "forward"],
    "With --config: the train step, or one forward at sampling.batch_size.",
)
flags.DEFINE_list("shapes", [], "BxHxWxCinxCout conv shapes per device (instead of --config).")
flags.DEFINE_integer("reps", 4, "Timed rounds; each program runs --calls times per round.")
flags.DEFINE_integer("calls", 2, "Calls per program per round.")
flags.DEFINE_integer("cpu_devices", 0, "CPU host devices (0: one per core).")

# name -> (model.cpu_kernels, Winograd where it applies)
_WAYS = {"plain": (False, False), "cpu_kernels_xla": (True, False), "cpu_kernels": (True, True)}


def _program(config, what):
  if what == "train":
    return bench_setup.compiled_train_step(config)
  compiled, args = bench_setup.compiled_forward(config)
  return lambda: compiled(*args)


def _config_programs(config, what):
  from unittest import mock  # pylint: disable=g-import-not-at-top
  from ddpm_jax.cpu import winograd  # pylint: disable=g-import-not-at-top

  if config.data.image_size < winograd.MIN_SIDE:
    print(
        f"note: {config.data.image_size}x{config.data.image_size} images: no conv uses "
        "Winograd, cpu_kernels_xla and cpu_kernels are the same program",
        file=sys.stderr,
    )
  progs = {}
  for name, (cpu_kernels, with_winograd) in _WAYS.items():
    cfg = bench_setup.with_cpu_kernels(config, cpu_kernels)
    if with_winograd:
      progs[name] = _program(cfg, what)
    else:  # cpu.conv.conv3x3 asks winograd.applies when the program is traced (compiled here)
      with mock.patch.object(winograd, "applies", lambda *args: False):
        progs[name] = _program(cfg, what)
  return progs


def _conv_programs(shape):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax.cpu import conv, winograd  # pylint: disable=g-import-not-at-top

  x, kernel, dy = bench_setup.conv_operands(shape)
  funcs = {
      "xla": lambda x, k: jax.lax.conv_general_dilated(
          x, k, (1, 1), "SAME", dimension_numbers=conv.DIMENSION_NUMBERS
      ),
      "cpu_conv3x3": lambda x, k: conv.conv3x3(x, k, (1, 1), "SAME"),
  }
  if shape[1] % winograd.TILE == 0 and shape[2] % winograd.TILE == 0:
    funcs["winograd"] = winograd.conv3x3
  progs = {}
  for name, f in funcs.items():

    def grads(x, k, dy, f=f):
      y, vjp = jax.vjp(f, x, k)
      return y, vjp(dy)

    fwd = jax.pmap(f).lower(x, kernel).compile()
    bwd = jax.pmap(grads).lower(x, kernel, dy).compile()
    progs[f"{name} forward"] = lambda fwd=fwd: fwd(x, kernel)
    progs[f"{name} forward+grads"] = lambda bwd=bwd: bwd(x, kernel, dy)
  ref = np.asarray(progs["xla forward"]())
  extra = {
      "winograd_applies": winograd.applies(x.shape[1:], kernel.shape[1:], (1, 1), "SAME", x.dtype),
  }
  for name in funcs:
    if name != "xla":
      err = np.abs(np.asarray(progs[f"{name} forward"]()) - ref).max() / np.abs(ref).max()
      extra[f"{name}_forward_max_rel_error"] = float(err)
  return progs, extra


def main(argv):
  del argv
  if FLAGS.config is not None:
    bench_setup.setup(FLAGS.config, FLAGS.cpu_devices)
  else:
    bench_setup.use_all_cores(FLAGS.cpu_devices)
  cases = {}
  if FLAGS.config is not None:
    cases[FLAGS.what] = (_config_programs(FLAGS.config, FLAGS.what), {})
  for s in FLAGS.shapes:
    cases[s] = _conv_programs(tuple(int(v) for v in s.split("x")))
  if not cases:
    raise app.UsageError("give --config or --shapes")
  results = {}
  for case, (progs, extra) in cases.items():

    def baseline(name, plain="plain" in progs):
      return "plain" if plain else "xla " + name.split(" ", 1)[1]

    ms = bench_setup.time_against_baselines(progs, baseline, FLAGS.reps, FLAGS.calls, case)
    results[case] = {n: round(v, 2) for n, v in ms.items()}
    results[case].update(extra)
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main)
