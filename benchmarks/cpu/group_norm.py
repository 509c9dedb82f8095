"""GroupNorm + swish: the U-Net's ``group_norm_channels_minor`` (CPU programs) against ``flax.linen.GroupNorm``.

  python benchmarks/cpu/group_norm.py [--shapes=8x32x32x32,8x16x16x64] [--reps=7]

Both compute the same two-pass GroupNorm (32 groups, eps 1e-6): ``flax`` is
``flax.linen.GroupNorm(use_fast_variance=False)``, the plain U-Net's; ``ours``
is ``ddpm_jax.models.unet.group_norm_channels_minor``, the U-Net's with
``model.cpu_kernels``. Each shape is timed forward and forward + backward on
one device, the two implementations alternating, and the medians are reported
with their ratio (Flax time / ours). Prints one JSON line per shape. Default
shapes: the activations of the 1.1M-parameter benchmark U-Net at 8 images per
device (batch 16 on 2 devices) and of the CIFAR-10 U-Net at 4.
"""

import json
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import bench_setup  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "shapes",
    "8x32x32x32,8x16x16x64,8x8x8x64,4x32x32x128,4x16x16x256",
    "Comma-separated BxHxWxC activation shapes.",
)
flags.DEFINE_integer("reps", 7, "Alternating timed repetitions per shape.")
flags.DEFINE_integer("calls", 10, "Calls per timed repetition.")


def main(argv):
  del argv
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax.models import unet  # pylint: disable=g-import-not-at-top

  flax_gn = nn.GroupNorm(num_groups=unet.GN_GROUPS, epsilon=unet.GN_EPS, use_fast_variance=False)
  impls = {
      "flax": lambda p, x: flax_gn.apply({"params": p}, x),
      "ours": lambda p, x: unet.group_norm_channels_minor(
          x, p["scale"], p["bias"], unet.GN_GROUPS, unet.GN_EPS
      ),
  }
  rng = np.random.default_rng(0)
  for spec in FLAGS.shapes.split(","):
    shape = tuple(int(s) for s in spec.split("x"))
    x = jnp.asarray(rng.normal(1.0, 2.0, shape), jnp.float32)
    p = {
        "scale": jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]), jnp.float32),
        "bias": jnp.asarray(rng.normal(0, 1, shape[-1]), jnp.float32),
    }
    progs = {}
    for name, f in impls.items():
      fwd = jax.jit(lambda p, x, f=f: nn.swish(f(p, x)))
      loss = lambda p, x, f=f: jnp.sum(jnp.sin(nn.swish(f(p, x))))
      fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
      jax.block_until_ready((fwd(p, x), fwd_bwd(p, x)))
      progs[name] = {"fwd": fwd, "fwd_bwd": fwd_bwd}
    err = float(jnp.max(jnp.abs(progs["flax"]["fwd"](p, x) - progs["ours"]["fwd"](p, x))))
    med = bench_setup.median_ms_alternating(progs, (p, x), FLAGS.reps, FLAGS.calls)
    print(
        json.dumps(
            dict(
                shape=spec,
                platform=jax.devices()[0].platform,
                max_abs_diff=err,
                **med,
                fwd_ratio=round(med["flax_fwd_ms"] / med["ours_fwd_ms"], 2),
                fwd_bwd_ratio=round(med["flax_fwd_bwd_ms"] / med["ours_fwd_bwd_ms"], 2),
            )
        ),
        flush=True,
    )


if __name__ == "__main__":
  app.run(main)
