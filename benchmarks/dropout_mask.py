"""Dropout masks: ``ddpm_jax.models.dropout.keep_mask`` against vmapped ``jax.random.bernoulli``.

  python benchmarks/dropout_mask.py [--shapes=16x32x32x32,4x32x32x128] [--reps=7]

Both give the same bits. Each shape is timed on one device as the U-Net uses
a mask, ``where(mask, h / 0.9, 0)``, forward and forward + backward, the two
implementations alternating; prints one JSON line per shape with the medians
and the ratio (JAX time / ours). Default shapes: the largest dropout inputs of
the 1.1M-parameter U-Net at 16 images per device (batch 32 on 2 devices) and of
the CIFAR-10 U-Net at 4.
"""

import json
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_setup  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("shapes", "16x32x32x32,16x16x16x64,4x32x32x128,4x16x16x256",
                    "Comma-separated BxHxWxC activation shapes.")
flags.DEFINE_integer("reps", 7, "Alternating timed repetitions per shape.")
flags.DEFINE_integer("calls", 10, "Calls per timed repetition.")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax.models import dropout  # pylint: disable=g-import-not-at-top

  rate = 0.1
  masks = {
      "jax": lambda k, s: jax.vmap(lambda kk: jax.random.bernoulli(kk, 1.0 - rate, s))(k),
      "ours": lambda k, s: dropout.keep_mask(k, 1.0 - rate, s),
  }
  for spec in FLAGS.shapes.split(","):
    shape = tuple(int(s) for s in spec.split("x"))
    h = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    keys = jax.random.split(jax.random.key(0), shape[0])
    progs = {}
    for name, mask in masks.items():
      def apply(h, keys, mask=mask):
        return jnp.where(mask(keys, h.shape[1:]), h / (1.0 - rate), 0.0)
      fwd = jax.jit(apply)
      grad = jax.jit(jax.grad(lambda h, keys, apply=apply: jnp.sum(apply(h, keys) * h)))
      progs[name] = {"fwd": fwd.lower(h, keys).compile(), "fwd_bwd": grad.lower(h, keys).compile()}
    np.testing.assert_array_equal(np.asarray(progs["jax"]["fwd"](h, keys)),
                                  np.asarray(progs["ours"]["fwd"](h, keys)))
    out = bench_setup.median_ms_alternating(progs, (h, keys), FLAGS.reps, FLAGS.calls)
    for kind in ("fwd", "fwd_bwd"):
      out[f"ratio_{kind}"] = round(out[f"jax_{kind}_ms"] / out[f"ours_{kind}_ms"], 2)
    print(json.dumps(dict(shape=spec, **out)), flush=True)


if __name__ == "__main__":
  bench_setup.use_all_cores(1)
  app.run(main)
