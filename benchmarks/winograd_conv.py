"""Winograd F(4x4, 3x3) against XLA's convolution on CPU: the train step, the sampler's forward, or single convs.

  python benchmarks/winograd_conv.py --config=configs/cifar10.py \
      --config.training.batch_size=8 [--what=train|forward] [--reps=4] [--calls=2]
  python benchmarks/winograd_conv.py --shapes=4x32x32x128x128,16x16x16x64x64
  python benchmarks/winograd_conv.py --config=configs/cifar10.py --config.model.ch=32 \
      '--config.model.ch_mult=(1,2,2)' --config.model.num_res_blocks=1 \
      --config.training.batch_size=32 --min_channels=64,32

``ddpm_jax.models.conv.CPU_WINOGRAD`` switches the U-Net's 3x3 stride-1 convs
between ``models/winograd.py`` (where ``winograd.applies``) and XLA's
convolution (``conv.conv2d``, with its chunked weight gradient). With --config,
the real pmap-ed train step (or, with --what=forward, one network forward at
``sampling.batch_size`` compiled with the samplers' XLA options) is compiled
both ways and the two programs are called in turns in one process. With
--min_channels, instead, every program uses Winograd where it applies and the
values are ``winograd.MIN_MEASURED_CHANNELS``: 64 turns the measured choice for
32-63 channels (``models/conv_timing.py``) off, 32 is the default. With
--shapes (``BxHxWxCinxCout`` per device), one conv's forward, and its forward
plus both gradients, are timed both ways on every device at once. Prints
milliseconds per call (medians over the rounds) and the speed-up on stderr,
and one JSON line on stdout.
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
config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
flags.DEFINE_enum("what", "train", ["train", "forward"],
                  "With --config: the train step, or one forward at sampling.batch_size.")
flags.DEFINE_list("shapes", [], "BxHxWxCinxCout conv shapes per device (instead of --config).")
flags.DEFINE_integer("reps", 4, "Timed rounds; each program runs --calls times per round.")
flags.DEFINE_integer("calls", 2, "Calls per program per round.")
flags.DEFINE_integer("cpu_devices", 0, "CPU host devices (0: one per core).")
flags.DEFINE_list("min_channels", [], "With --config: winograd.MIN_MEASURED_CHANNELS values "
                  "to compare (the first is the baseline) instead of Winograd off and on.")

_WAYS = {"xla": False, "winograd": True}


def _forward_program(config):
  compiled, args = bench_setup.compiled_forward(config)
  return lambda: compiled(*args)


def _config_programs(config, what, min_channels):
  from ddpm_jax.models import conv, winograd  # pylint: disable=g-import-not-at-top
  if min_channels:
    ways = {f"min{m}": (True, int(m)) for m in min_channels}
  else:
    ways = {name: (on, winograd.MIN_MEASURED_CHANNELS) for name, on in _WAYS.items()}
  progs = {}
  for name, (on, min_measured) in ways.items():
    # Both read when the program is traced below.
    conv.CPU_WINOGRAD, winograd.MIN_MEASURED_CHANNELS = on, min_measured
    progs[name] = (bench_setup.compiled_train_step(config) if what == "train"
                   else _forward_program(config))
  return progs


def _conv_programs(shape):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax.models import conv, winograd  # pylint: disable=g-import-not-at-top
  x, kernel, dy = bench_setup.conv_operands(shape)
  funcs = {"xla": lambda x, k: conv.conv2d(x, k, (1, 1), "SAME"), "winograd": winograd.conv3x3}
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
  err = float(jnp.max(jnp.abs(progs["winograd forward"]() - ref)) / np.abs(ref).max())
  return progs, err


def main(argv):
  del argv
  bench_setup.use_all_cores(FLAGS.cpu_devices)
  cases = {}
  if FLAGS.config is not None:
    cases[FLAGS.what] = (_config_programs(FLAGS.config, FLAGS.what, FLAGS.min_channels), None)
  for s in FLAGS.shapes:
    cases[s] = _conv_programs(tuple(int(v) for v in s.split("x")))
  if not cases:
    raise app.UsageError("give --config or --shapes")
  results = {}
  for case, (progs, err) in cases.items():
    first = next(iter(progs))
    baseline = ((lambda n: first) if first.startswith("min")
                else (lambda n: n.replace("winograd", "xla")))
    ms = bench_setup.time_against_baselines(progs, baseline, FLAGS.reps, FLAGS.calls, case)
    results[case] = {n: round(v, 2) for n, v in ms.items()}
    if err is not None:
      results[case]["forward_max_rel_error"] = err
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main)
