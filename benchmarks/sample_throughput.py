"""Sampler throughput: compile time and images/s of each sampler; prints one JSON line per sampler.

  python benchmarks/sample_throughput.py --config=configs/cifar10.py \
      --config.sampling.batch_size=16 [--samplers=ancestral:0,ddim:50,ancestral:50]

Each entry is SAMPLER:STEPS (0 = all T steps). Parameters are random (a
throughput measurement needs no trained weights). The whole reverse process
is one lax.scan, so compile time should not grow with the number of steps:
compare compile_s of ancestral:0 (T steps) with ancestral:10. The process is
set up as main.py does (see train_throughput.py); each line also reports the
page faults per sampler step and the C allocator (``malloc``).
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_setup  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
flags.DEFINE_string(
    "samplers",
    "ancestral:0,ddim:50,ancestral:10",
    "Comma-separated SAMPLER:STEPS (0 = all T steps).",
)
flags.DEFINE_integer("reps", 1, "Timed calls per sampler (after the compiling call).")
flags.DEFINE_integer("cpu_devices", 0, "CPU host devices (0: one per core).")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  config = FLAGS.config
  bench_setup.setup(config, FLAGS.cpu_devices)
  import resource  # pylint: disable=g-import-not-at-top
  import statistics  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax import sample  # pylint: disable=g-import-not-at-top
  from ddpm_jax import builders  # pylint: disable=g-import-not-at-top

  d = jax.local_device_count()
  per_call = config.sampling.batch_size
  model, p_params = bench_setup.model_and_random_params(config)
  for spec in FLAGS.samplers.split(","):
    name, steps = spec.split(":")
    config.sampling.sampler = name
    config.sampling.num_steps = int(steps)
    diffusion = builders.build_sampling_diffusion(config)
    p_sample = sample.make_p_sample(model, diffusion, config, per_call // d)
    keys = jnp.broadcast_to(jax.random.PRNGKey(0), (d, 2))
    labels_fn = sample.labels_in_turn(config)
    labels = None if labels_fn is None else labels_fn(np.arange(per_call)).reshape(d, -1)
    t = time.perf_counter()
    compiled = p_sample.compile(p_params, keys, labels)
    compile_s = time.perf_counter() - t
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(FLAGS.reps):
      t = time.perf_counter()
      jax.block_until_ready(compiled(p_params, keys, labels))
      times.append(time.perf_counter() - t)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    run_s = statistics.median(times)
    print(
        json.dumps(
            dict(
                framework="jax",
                platform=jax.devices()[0].platform,
                devices=d,
                sampler=name,
                steps=builders.sampling_steps(config),
                images=per_call,
                image_size=config.data.image_size,
                dtype=config.model.dtype,
                cpu_kernels=model.cpu_kernels,
                compile_options=p_sample.options,
                compile_s=round(compile_s, 2),
                sample_s=round(run_s, 3),
                step_s=round(run_s / builders.sampling_steps(config), 5),
                images_per_s=round(per_call / run_s, 4),
                page_faults_per_step=round(faults / FLAGS.reps / builders.sampling_steps(config)),
                **bench_setup.malloc_info(),
                all_s=[round(x, 3) for x in times],
            )
        ),
        flush=True,
    )


if __name__ == "__main__":
  app.run(main)
