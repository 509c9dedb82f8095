"""The train step compiled under several XLA:CPU option sets, alternating in one process.

  python benchmarks/cpu/xla_options.py --config=configs/cifar10.py [--config.field=...] \
      [--sets=default,no_ynn_reduce,ynn_eltwise,vector_width_512,onednn]

Each named set is a dict of compiler options for ``Lowered.compile``; a set
that this jaxlib rejects is reported and skipped. Prints the median ms per
step of every set and its ratio to the defaults (default time / set time, so
above 1 is faster) as one JSON line. This is how the train step's defaults
and the samplers' options with the CPU kernels
(``ddpm_jax/cpu/compile_options.py``) were chosen.
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
config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
flags.DEFINE_list(
    "sets",
    ["default", "no_ynn_reduce", "ynn_eltwise", "vector_width_512", "onednn"],
    "Option sets to compare (names in SETS).",
)
flags.DEFINE_integer("reps", 5, "Timed rounds; each program runs --calls times per round.")
flags.DEFINE_integer("calls", 3, "Calls per program per round.")
flags.DEFINE_integer("cpu_devices", 0, "CPU host devices (0: one per core).")
flags.mark_flags_as_required(["config"])

_YNN = "xla_cpu_experimental_ynn_fusion_type"
_DOT, _CONV = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
SETS = {
    "default": {},
    "no_ynn_reduce": {_YNN: f"{_DOT},{_CONV}"},  # the samplers' CPU options
    "ynn_eltwise": {_YNN: f"{_DOT},{_CONV},LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_ELTWISE"},
    "ynn_dot_fusions": {_YNN: f"LIBRARY_FUSION_TYPE_DOT,{_CONV},LIBRARY_FUSION_TYPE_REDUCE"},
    "vector_width_512": {"xla_cpu_prefer_vector_width": 512},
    "onednn": {"xla_cpu_use_onednn": True},
    "no_concurrency_scheduler": {"xla_cpu_enable_concurrency_optimized_scheduler": False},
}


def main(argv):
  del argv
  bench_setup.setup(FLAGS.config, FLAGS.cpu_devices)
  import jax  # pylint: disable=g-import-not-at-top

  progs, rejected = {}, {}
  for name in FLAGS.sets:
    try:
      call = bench_setup.compiled_train_step(FLAGS.config, SETS[name])
    except jax.errors.JaxRuntimeError as e:
      rejected[name] = str(e).splitlines()[0][:200]
      continue
    jax.block_until_ready(call())  # one untimed call each
    progs[name] = {"step": call}
  medians = bench_setup.median_ms_alternating(progs, (), FLAGS.reps, FLAGS.calls)
  ms = {name: medians[f"{name}_step_ms"] for name in progs}
  out = {"step_ms": ms, "rejected": rejected}
  if "default" in ms:
    out["speedup_vs_default"] = {n: round(ms["default"] / v, 3) for n, v in ms.items()}
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
