"""What a compiled TPU program spends: XLA's cost model and the optimised HLO, by operation kind.

Compiles one program of a config (``--program=train|sample_step``) for a TPU
slice with libtpu (no TPU needed) and prints one JSON line: XLA's estimated
time, FLOPs, bytes accessed, and per operation kind in the optimised HLO the
count, the result bytes and the dtypes (convolutions, dots, converts, fusions,
reductions, all-reduces). ``--set=field=value,...`` compares variants: each is
compiled in turn, e.g.

  python benchmarks/tpu_program.py --config=configs/cifar10.py --topology=v3-8 \\
      --variants='model.dtype=float32;model.dtype=bfloat16'

``sample_step`` is one network call of the sampler at ``sampling.batch_size``
(the 1000-step loop repeats it). The times are XLA's estimates, not measurements.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks.hlo import hlo_breakdown  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string("config", "configs/cifar10.py", "Config file.")
flags.DEFINE_string("topology", "v3-8", "TPU slice.")
flags.DEFINE_enum("program", "train", ["train", "sample_step"], "Which program.")
flags.DEFINE_string("variants", "", "';'-separated variants, each 'field=value,field=value'.")
FLAGS = flags.FLAGS


def compile_one(config, topology_name: str, program: str) -> dict:
  from ddpm_jax import compile_check, tpu  # pylint: disable=g-import-not-at-top
  from ddpm_jax import builders  # pylint: disable=g-import-not-at-top

  devices = tpu.devices(tpu.parse(topology_name))
  start = time.time()
  if program == "train":
    p = compile_check.build_programs(config, devices)["train"]
    compiled = p.lower(p.batch).compile()
  else:
    model = builders.build_model(config, platform="tpu")
    b = config.sampling.batch_size // len(devices)
    compiled = compile_check._forward_program(model, config, devices, b, False).compile()
  cost = compiled.cost_analysis() or {}
  mem = compiled.memory_analysis()
  keep = ("convolution", "dot", "convert", "fusion", "reduce", "all-reduce", "custom-call")
  ops = {k: v for k, v in hlo_breakdown(compiled.as_text()).items() if k in keep}
  return dict(
      compile_seconds=round(time.time() - start, 1),
      estimated_ms=round(1e3 * cost.get("optimal_seconds", float("nan")), 3),
      tflops=round(cost.get("flops", 0) / 1e12, 4),
      bytes_accessed_gib=round(cost.get("bytes accessed", 0) / 2**30, 3),
      temp_gib=round(mem.temp_size_in_bytes / 2**30, 3),
      ops=ops,
  )


def main(argv):
  del argv
  from ddpm_jax import config_loading, tpu  # pylint: disable=g-import-not-at-top

  tpu.prepare_environment()
  for variant in FLAGS.variants.split(";") if FLAGS.variants else [""]:
    overrides = [f"--config.{kv}" for kv in variant.split(",") if kv]
    config = config_loading.load(FLAGS.config, overrides)
    got = compile_one(config, FLAGS.topology, FLAGS.program)
    print(
        json.dumps(
            dict(
                config=FLAGS.config,
                topology=FLAGS.topology,
                program=FLAGS.program,
                variant=variant,
                **got,
            )
        ),
        flush=True,
    )


if __name__ == "__main__":
  app.run(main)
