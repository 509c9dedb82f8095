"""Dropout masks: ``ddpm_jax.cpu.dropout.keep_mask`` against vmapped ``jax.random.bernoulli``.

  python benchmarks/cpu/dropout_mask.py [--shapes=16x32x32x32,4x32x32x128] [--reps=7]
  python benchmarks/cpu/dropout_mask.py --config=configs/cifar10.py [--config.field=...]

Three ways to the same bits: ``ours`` (``keep_mask`` as the U-Net with
``model.cpu_kernels`` calls it: the mask is computed once and stored),
``fused`` (``stored=False``: the written-out hash, which XLA fuses into, and so
recomputes in, each use) and ``jax`` (what the plain U-Net does). With
``--shapes``, each shape is timed on one device as the U-Net uses a mask,
``where(mask, h / 0.9, 0)``, forward and forward + backward, the variants
alternating; one JSON line per shape with the medians and the ratios
(``ratio_fused_*``, ``ratio_jax_*``: that variant's time / ours). Default
shapes: the largest dropout inputs of the 1.1M-parameter U-Net at 16 images per
device (batch 32 on 2 devices) and of the CIFAR-10 U-Net at 4. Run it under
``taskset -c 0`` to see one core, as each device gets when the batch is split
over all cores.

With ``--config``, the whole train step with ``model.cpu_kernels=True`` is
compiled once per variant in one process (on every core, as training runs),
``cpu.dropout.keep_mask`` being replaced by the variant while the step is
traced, and the programs alternate; one JSON line with the medians and the
ratios. The config needs ``model.dropout > 0``.
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
    "config", None, "Experiment config: time the train step.", lock_config=True
)
flags.DEFINE_string(
    "shapes",
    "16x32x32x32,16x16x16x64,4x32x32x128,4x16x16x256",
    "Comma-separated BxHxWxC activation shapes (without --config).",
)
flags.DEFINE_integer("reps", 7, "Alternating timed repetitions.")
flags.DEFINE_integer("calls", 10, "Calls per timed repetition (--config: 3 is plenty).")

RATE = 0.1


def _jax_masks(keys, keep_prob, shape):
  import jax  # pylint: disable=g-import-not-at-top

  return jax.vmap(lambda k: jax.random.bernoulli(k, keep_prob, tuple(shape)))(keys)


def _variants():
  """name -> mask function: ours as used (stored on CPU), ours fused into each use, JAX's."""
  import functools  # pylint: disable=g-import-not-at-top
  from ddpm_jax.cpu import dropout  # pylint: disable=g-import-not-at-top

  return {
      "ours": dropout.keep_mask,
      "fused": functools.partial(dropout.keep_mask, stored=False),
      "jax": _jax_masks,
  }


def _ratios(out, kinds):
  for kind in kinds:
    for other in ("fused", "jax"):
      out[f"ratio_{other}_{kind}"] = round(out[f"{other}_{kind}_ms"] / out[f"ours_{kind}_ms"], 3)


def _train_step(config):
  from unittest import mock  # pylint: disable=g-import-not-at-top
  from ddpm_jax.cpu import dropout  # pylint: disable=g-import-not-at-top

  if not config.model.dropout:
    raise app.UsageError("--config: model.dropout is 0, the train step draws no masks")
  progs = {}
  for name, masks in _variants().items():
    with mock.patch.object(dropout, "keep_mask", masks):  # read when the step is traced
      call = bench_setup.compiled_train_step(config)
    call()  # one untimed call each
    progs[name] = {"step": call}
  out = bench_setup.median_ms_alternating(progs, (), FLAGS.reps, FLAGS.calls)
  _ratios(out, ["step"])
  print(json.dumps(dict(case="train_step", **out)), flush=True)


def _shapes():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  masks = _variants()
  for spec in FLAGS.shapes.split(","):
    shape = tuple(int(s) for s in spec.split("x"))
    h = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    keys = jax.random.split(jax.random.key(0), shape[0])
    progs = {}
    for name, mask in masks.items():

      def apply(h, keys, mask=mask):
        return jnp.where(mask(keys, 1.0 - RATE, h.shape[1:]), h / (1.0 - RATE), 0.0)

      fwd = jax.jit(apply)
      grad = jax.jit(jax.grad(lambda h, keys, apply=apply: jnp.sum(apply(h, keys) * h)))
      progs[name] = {"fwd": fwd.lower(h, keys).compile(), "fwd_bwd": grad.lower(h, keys).compile()}
    for name in masks:
      np.testing.assert_array_equal(
          np.asarray(progs["jax"]["fwd"](h, keys)), np.asarray(progs[name]["fwd"](h, keys))
      )
    out = bench_setup.median_ms_alternating(progs, (h, keys), FLAGS.reps, FLAGS.calls)
    _ratios(out, ["fwd", "fwd_bwd"])
    print(json.dumps(dict(shape=spec, **out)), flush=True)


def main(argv):
  del argv
  if FLAGS.config is not None:
    config = bench_setup.with_cpu_kernels(FLAGS.config)
    bench_setup.setup(config)
    _train_step(config)
  else:
    bench_setup.use_all_cores(1)
    _shapes()


if __name__ == "__main__":
  app.run(main)
