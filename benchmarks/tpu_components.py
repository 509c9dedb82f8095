"""XLA's TPU cost model for each U-Net component, float32 against bfloat16, forward and backward.

Compiles, for one compile-only TPU device (libtpu, no TPU needed), the
gradient of ``sum(f(x) * g)`` with respect to the input and the parameters of
one component of the paper's U-Net at the shapes the CIFAR-10 model gives it
per device (batch 16 on a v3-8), and prints one JSON line per component and
dtype: XLA's estimated time, the sum of its per-instruction cycle estimates
(``estimated_cycles``, which it gives for v4 and v5e where the time is not a
positive number), FLOPs, bytes accessed and the optimised HLO's operation
counts. A component whose bfloat16 program is not cheaper than its
float32 one is where the whole step's bfloat16 gain goes missing.

  python benchmarks/tpu_components.py --topology=v3-8 --batch=16

The times are XLA's estimates, not measurements.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string("topology", "v3-8", "TPU slice whose first device is compiled for.")
flags.DEFINE_integer("batch", 16, "Images per device.")
flags.DEFINE_string("components", "", "Comma-separated subset of the components (default: all).")
flags.DEFINE_string("dtypes", "float32,bfloat16", "Computation dtypes to compare.")
flags.DEFINE_string("hlo_dir", "", "If set, each optimised HLO is written there (for hlo.py).")
FLAGS = flags.FLAGS


def components(b: int):
  """{name: (module constructor taking dtype, input shapes)} at the CIFAR-10 model's shapes."""
  from ddpm_jax.models import unet  # pylint: disable=g-import-not-at-top

  temb = (b, 512)
  return {
      "resblock_128_32x32": (
          lambda dt: unet.ResnetBlock(128, 0.1, dt, name="block"),
          [(b, 32, 32, 128), temb],
      ),
      "resblock_256_16x16": (
          lambda dt: unet.ResnetBlock(256, 0.1, dt, name="block"),
          [(b, 16, 16, 256), temb],
      ),
      "resblock_384to256_32x32": (
          lambda dt: unet.ResnetBlock(256, 0.1, dt, name="block"),
          [(b, 32, 32, 384), temb],
      ),
      "attn_256_16x16": (lambda dt: unet.AttnBlock(dt, name="attn"), [(b, 16, 16, 256)]),
      "downsample_128_32x32": (lambda dt: unet.Downsample(True, dt), [(b, 32, 32, 128)]),
      "upsample_256_16x16": (lambda dt: unet.Upsample(True, dt), [(b, 16, 16, 256)]),
      "unet_cifar10": (lambda dt: unet.UNet(dtype=dt), [(b, 32, 32, 3), (b,)]),
  }


def compile_component(make, shapes, dtype_name: str, device) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from benchmarks.hlo import hlo_breakdown, instruction_cycles  # pylint: disable=g-import-not-at-top

  module = make(getattr(jnp, dtype_name))
  is_unet = len(shapes) == 2 and len(shapes[1]) == 1
  args = [jnp.zeros(s, jnp.int32 if len(s) == 1 else jnp.float32) for s in shapes]
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  params = jax.eval_shape(lambda: module.init(rngs, *args))
  out = jax.eval_shape(lambda p: module.apply(p, *args, rngs=rngs), params)

  trains = is_unet or type(module).__name__ == "ResnetBlock"

  def loss(p, x, rest, g, key):
    # Per-example dropout keys, as the train step passes them.
    kw = {"train": True, "dropout_keys": jax.random.split(key, x.shape[0])} if trains else {}
    if is_unet:
      rest = [rest[0], None]
    y = module.apply(p, x, *rest, **kw)
    return jnp.sum(y.astype(jnp.float32) * g)

  def step(p, x, rest, g, key):
    return jax.grad(loss, argnums=(0, 1))(p, x, rest, g, key)

  sharding = jax.sharding.SingleDeviceSharding(device)
  spec = lambda t: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), t
  )
  abstract = (
      spec(params),
      spec(jax.ShapeDtypeStruct(shapes[0], jnp.float32)),
      spec(
          [jax.ShapeDtypeStruct(s, jnp.int32 if len(s) == 1 else jnp.float32) for s in shapes[1:]]
      ),
      spec(jax.ShapeDtypeStruct(out.shape, jnp.float32)),
      spec(jax.eval_shape(lambda: jax.random.key(0))),
  )
  start = time.time()
  compiled = jax.jit(step).lower(*abstract).compile()
  cost = compiled.cost_analysis() or {}
  keep = ("convolution", "dot", "convert", "fusion", "reduce", "copy", "transpose")
  text = compiled.as_text()
  if FLAGS.hlo_dir:
    name = f"{type(module).__name__}_{dtype_name}.hlo"
    with open(os.path.join(FLAGS.hlo_dir, name), "w") as f:
      f.write(text)
  ops = {k: v["count"] for k, v in hlo_breakdown(text).items() if k in keep}
  return dict(
      compile_seconds=round(time.time() - start, 1),
      estimated_us=round(1e6 * cost.get("optimal_seconds", float("nan")), 1),
      # The per-instruction estimates summed (available where optimal_seconds is not).
      instruction_mcycles=round(sum(i["cycles"] for i in instruction_cycles(text)) / 1e6, 3),
      gflops=round(cost.get("flops", 0) / 1e9, 3),
      bytes_accessed_mib=round(cost.get("bytes accessed", 0) / 2**20, 1),
      temp_mib=round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1),
      ops=ops,
  )


def main(argv):
  del argv
  from ddpm_jax import tpu  # pylint: disable=g-import-not-at-top

  device = tpu.devices(tpu.parse(FLAGS.topology))[0]
  wanted = set(filter(None, FLAGS.components.split(",")))
  for name, (make, shapes) in components(FLAGS.batch).items():
    if wanted and name not in wanted:
      continue
    for dt in FLAGS.dtypes.split(","):
      got = compile_component(make, shapes, dt, device)
      print(json.dumps(dict(component=name, dtype=dt, topology=FLAGS.topology, **got)), flush=True)


if __name__ == "__main__":
  app.run(main)
