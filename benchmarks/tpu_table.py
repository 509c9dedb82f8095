"""docs/tpu.md's tables: programs of a config compiled for several TPU slices and dtypes.

Each (topology, dtype) pair is ``--mode=compile`` restricted to ``--programs``
(the same code path), one markdown row per program, e.g.

  python benchmarks/tpu_table.py --config=configs/cifar10.py --programs=train \\
      --topologies=v3-8,v4-8,v5e-8,v5p-8,v6e-8 --dtypes=float32,bfloat16 --workdir=/tmp/tpu

Rows give per-device memory against HBM, FLOPs per image, XLA's estimated
time per call, the implied steps/s and images/s, and for training the time
XLA's estimate implies for ``--steps`` (default 800k, the paper's CIFAR-10
run). Every time is XLA's cost-model estimate, not a measurement.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string("config", "configs/cifar10.py", "Config file.")
flags.DEFINE_list("topologies", ["v3-8"], "TPU slices.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "model.dtype values.")
flags.DEFINE_list("programs", ["train"], "Programs (see ddpm_jax.compile_check.PROGRAMS).")
flags.DEFINE_list("overrides", [], "Extra config overrides, 'field=value'.")
flags.DEFINE_integer("steps", 800_000, "Training steps for the predicted run time.")
flags.DEFINE_string("workdir", "/tmp/ddpm_jax_tpu_table", "Where the compile_*.json files go.")
FLAGS = flags.FLAGS


def markdown_row(config_name: str, topology: str, dtype: str, row: dict, steps: int) -> str:
  from ddpm_jax import compile_check  # pylint: disable=g-import-not-at-top

  gib = lambda x: f"{x / 2**30:.2f}"
  est = row.get("estimated_seconds_per_call")
  if row.get("total_bytes") is None:
    mem = "out of memory"
  else:
    mem = f"{gib(row['argument_bytes'])} + {gib(row['temp_bytes'])} = {gib(row['total_bytes'])} / {gib(row['hbm_bytes'])}"
  cells = [
      config_name,
      topology,
      dtype,
      row["program"],
      str(row["per_device_batch"]),
      mem,
      f"{row['flops_per_image'] / 1e9:.1f}" if "flops_per_image" in row else "",
      f"{est * 1e3:.1f}" if est else "unavailable",
      f"{row['estimated_steps_per_second']:.1f}"
      if est and "estimated_steps_per_second" in row
      else "",
      compile_check.format_rate(row["estimated_images_per_second"]) if est else "",
      f"{100 * row['estimated_fraction_of_peak']:.0f}%" if est else "",
      (
          f"{steps / row['estimated_steps_per_second'] / 3600:.1f} h"
          if est and "estimated_steps_per_second" in row
          else ""
      ),
      "yes" if row["fits"] else f"no (largest b {row.get('largest_fitting_per_device_batch')})",
  ]
  return "| " + " | ".join(cells) + " |"


HEADER = (
    "| config | slice | dtype | program | b/device | args + temp = total / HBM GiB | GFLOP/image"
    " | est. ms/call | est. steps/s | est. images/s | of peak | est. 800k steps | fits |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv):
  del argv
  from ddpm_jax import compile_check, config_loading, host, tpu  # pylint: disable=g-import-not-at-top

  tpu.prepare_environment()
  host.setup_logging()
  print(HEADER, flush=True)
  name = os.path.splitext(os.path.basename(FLAGS.config))[0]
  for topology in FLAGS.topologies:
    for dtype in FLAGS.dtypes:
      overrides = [f"--config.model.dtype={dtype}"] + [f"--config.{o}" for o in FLAGS.overrides]
      config = config_loading.load(FLAGS.config, overrides)
      workdir = os.path.join(FLAGS.workdir, f"{name}_{dtype}")
      os.makedirs(workdir, exist_ok=True)
      report = compile_check.run_compile(config, workdir, topology, programs=FLAGS.programs)
      for row in report["programs"]:
        print(
            markdown_row(
                name,
                f"{topology} ({report['hosts']} host{'s' * (report['hosts'] > 1)})",
                dtype,
                row,
                FLAGS.steps,
            ),
            flush=True,
        )


if __name__ == "__main__":
  app.run(main)
