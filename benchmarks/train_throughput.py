"""Training throughput of the real pmap-ed train step; prints one JSON line.

  python benchmarks/train_throughput.py --config=configs/cifar10.py \
      --config.training.batch_size=8 [--steps=10] [--peak_tflops=0.2]

Reports compile time, the median steady-state step time, images/s, the FLOPs of
one step from XLA's cost analysis, achieved FLOP/s and the fraction of a peak
(given with --peak_tflops, or measured with a float32 matmul when 0), and peak
host / device memory, the page faults per step and the C allocator (``malloc``:
'system', 'glibc_thp', 'jemalloc', ...; ``host_malloc.py`` compares them). The
process is set up as main.py does (``ddpm_jax.host.setup``): on a CPU host the
batch is split over one device per core (--cpu_devices to change that).
"""

import json
import os
import resource
import statistics
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_setup  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
flags.DEFINE_integer("steps", 10, "Timed calls of the train step.")
flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation.")
flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of the hardware (0: measure a matmul).")
flags.DEFINE_integer("cpu_devices", 0, "CPU host devices (0: one per core).")
flags.mark_flags_as_required(["config"])


def measure_matmul_peak(jax, jnp, n=2048, reps=10):
  """FLOP/s of a float32 n x n matmul on all local devices at once (pmap)."""
  d = jax.local_device_count()
  x = jnp.ones((d, n, n), jnp.float32)
  f = jax.pmap(lambda a: a @ a)
  f(x).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    y = f(x)
  y.block_until_ready()
  return 2 * n**3 * d * reps / (time.perf_counter() - t)


def main(argv):
  del argv
  config = FLAGS.config
  bench_setup.setup(config, FLAGS.cpu_devices)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax import cpu as cpu_lib, parallel  # pylint: disable=g-import-not-at-top
  from ddpm_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  d = jax.local_device_count()
  n = config.training.steps_per_call
  loop = step_lib.multi_step_loop(config)
  p_step, state, batch = bench_setup.train_step_and_inputs(config)

  t0 = time.perf_counter()
  compiled = p_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops_per_call = float(cost.get("flops", 0.0)) * d  # cost analysis is per device
  if loop == "scan":
    flops_per_call *= n  # XLA's cost analysis counts a while-loop body once

  for _ in range(FLAGS.warmup):
    state, metrics = p_step(state, batch)
  jax.block_until_ready(state)
  times = []
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(FLAGS.steps):
    t = time.perf_counter()
    state, metrics = p_step(state, batch)
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - t) / n)
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / FLAGS.steps / n
  step_s = statistics.median(times)
  peak = FLAGS.peak_tflops * 1e12 if FLAGS.peak_tflops else measure_matmul_peak(jax, jnp)
  achieved = flops_per_call / n / step_s
  device_peak = None
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    device_peak = int(stats["peak_bytes_in_use"])
  print(
      json.dumps(
          dict(
              framework="jax",
              jax_version=jax.__version__,
              platform=jax.devices()[0].platform,
              devices=d,
              batch=config.training.batch_size,
              image_size=config.data.image_size,
              dtype=config.model.dtype,
              steps_per_call=n,
              cpu_kernels=cpu_lib.cpu_kernels_active(config),
              multi_step_loop=loop,
              grad_all_reduce=step_lib.grad_all_reduce(config),
              grad_accum_steps=config.training.grad_accum_steps,
              remat=config.model.remat,
              params=int(sum(x.size for x in jax.tree.leaves(parallel.unreplicate(state.params)))),
              compile_s=round(compile_s, 2),
              median_step_s=round(step_s, 5),
              images_per_s=round(config.training.batch_size / step_s, 2),
              gflop_per_step=round(flops_per_call / n / 1e9, 2),
              achieved_tflops=round(achieved / 1e12, 4),
              peak_tflops=round(peak / 1e12, 4),
              fraction_of_peak=round(achieved / peak, 4),
              peak_host_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              peak_device_bytes=device_peak,
              page_faults_per_step=round(faults),
              **bench_setup.malloc_info(),
              all_step_s=[round(x, 5) for x in times],
              loss=float(np.asarray(metrics["loss"])[0, -1]),
          )
      )
  )


if __name__ == "__main__":
  app.run(main)
