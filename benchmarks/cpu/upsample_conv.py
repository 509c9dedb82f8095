"""Upsample conv: the CPU kernels' two-phase ``upsample2x_conv3x3`` against repeat-then-conv.

  python benchmarks/cpu/upsample_conv.py [--shapes=8x16x16x64,4x16x16x256] [--reps=5]

All compute the 3x3 'SAME' conv of the 2x nearest-neighbour upsampling of a
``[B, H, W, C]`` input (C -> C channels, as in the U-Net's Upsample blocks):
``repeat_then_conv`` as the plain model does (``jnp.repeat``, then XLA's
convolution), ``repeat_then_cpu_conv3x3`` (the repeat, then
``ddpm_jax.cpu.conv.conv3x3``: Winograd where it applies) and ``two_phase``
(``ddpm_jax.cpu.upsample.upsample2x_conv3x3``, what the U-Net uses with
``model.cpu_kernels``). Each shape is timed forward and forward + backward
(gradients of input, kernel and bias) on one device, the variants alternating;
prints one JSON line per shape with the medians, the largest difference from
``repeat_then_conv`` and the ratios (repeat-then-conv time / the variant's).
Default shapes: the inputs of the Upsample blocks of the 1.1M-parameter
benchmark U-Net at 8 images per device and of the CIFAR-10 U-Net at 4.
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
    "8x8x8x64,8x16x16x64,4x4x4x256,4x8x8x256,4x16x16x256",
    "Comma-separated BxHxWxC input shapes (the output is Bx2Hx2WxC).",
)
flags.DEFINE_integer("reps", 5, "Alternating timed repetitions per shape.")
flags.DEFINE_integer("calls", 3, "Calls per timed repetition.")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax.cpu import conv, upsample  # pylint: disable=g-import-not-at-top

  def repeat(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)

  def repeat_then_conv(x, kernel, bias):
    y = jax.lax.conv_general_dilated(
        repeat(x), kernel, (1, 1), "SAME", dimension_numbers=conv.DIMENSION_NUMBERS
    )
    return y + bias

  def repeat_then_cpu_conv3x3(x, kernel, bias):
    return conv.conv3x3(repeat(x), kernel, (1, 1), "SAME") + bias

  impls = {
      "repeat_then_conv": repeat_then_conv,
      "repeat_then_cpu_conv3x3": repeat_then_cpu_conv3x3,
      "two_phase": upsample.upsample2x_conv3x3,
  }
  rng = np.random.default_rng(0)
  for spec in FLAGS.shapes.split(","):
    shape = tuple(int(s) for s in spec.split("x"))
    c = shape[-1]
    args = (
        jnp.asarray(rng.normal(size=shape), jnp.float32),
        jnp.asarray(rng.normal(size=(3, 3, c, c)) / np.sqrt(9 * c), jnp.float32),
        jnp.asarray(rng.normal(size=c), jnp.float32),
    )
    progs = {}
    for name, f in impls.items():
      fwd = jax.jit(f)
      fwd_bwd = jax.jit(jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2)))
      jax.block_until_ready((fwd(*args), fwd_bwd(*args)))
      progs[name] = {"fwd": fwd, "fwd_bwd": fwd_bwd}
    ref = progs["repeat_then_conv"]["fwd"](*args)
    out = dict(shape=spec, platform=jax.devices()[0].platform)
    for name in impls:
      if name != "repeat_then_conv":
        diff = jnp.max(jnp.abs(progs[name]["fwd"](*args) - ref)) / jnp.max(jnp.abs(ref))
        out[f"{name}_max_rel_diff"] = float(diff)
    med = bench_setup.median_ms_alternating(progs, args, FLAGS.reps, FLAGS.calls)
    out.update(med)
    for name in impls:
      if name != "repeat_then_conv":
        for kind in ("fwd", "fwd_bwd"):
          base = med[f"repeat_then_conv_{kind}_ms"]
          out[f"{name}_{kind}_ratio"] = round(base / med[f"{name}_{kind}_ms"], 2)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
  app.run(main)
