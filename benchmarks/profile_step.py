"""Where the time of one train step (or one network forward) goes, by kind of operation.

  python benchmarks/profile_step.py --config=configs/cifar10.py \
      --config.training.batch_size=8 [--what=train|forward] [--calls=2]

Runs the real pmap-ed program a few times under ``jax.profiler``, reads the
trace, and adds up the time of every executed HLO operation (thunk) by kind:
convolutions split into forward / input-gradient (3x3, 2x2 or 1x1 windows) and
weight-gradient (any other window: the whole image), dots, other YNNPACK
fusions (reductions), all-reduce, copies, and XLA's own fusions by the name
XLA gives them. Prints a table on stderr and one JSON line on stdout. Times
are per device and per call; devices run at the same time, so the sum can be
close to the wall time of a call but is not the same thing.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_setup  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
flags.DEFINE_enum("what", "train", ["train", "forward"], "The train step or one network forward.")
flags.DEFINE_integer("calls", 2, "Profiled calls (after two untimed ones).")
flags.DEFINE_integer("top", 15, "Rows of the table.")
flags.DEFINE_integer("cpu_devices", 0, "CPU host devices (0: one per core).")
flags.DEFINE_integer(
    "ops", 0, "Also list this many single operations, slowest first, with their HLO."
)
flags.mark_flags_as_required(["config"])

_HOST_EVENTS = (
    "ThunkExecutor",
    "Pjit",
    "$",
    "Common",
    "Wait",
    "Rendezvous",
    "[",
    "end:",
    "Handle",
    "Allocate",
    "SlinkyThreadPool",
    "cpp_pjit",
    "shard_args",
    "ThreadpoolListener",
    "PythonRefManager",
    "InvokeRendezvous",
    "ParseArguments",
)


def kind_of(name: str, hlo: str) -> str:
  """The kind of the HLO operation ``name`` in the compiled module text ``hlo``."""
  m = re.search(r"\n\s*(?:ROOT )?%?" + re.escape(name) + r" = [^\n]*", hlo)
  if m is None:
    return name.split(".")[0]
  line = m.group(0)
  called = re.search(r"calls=%?([\w.\-]+)", line)
  body = line
  if called:
    b = re.search(r"\n%?" + re.escape(called.group(1)) + r" [^\n]*\{\n(.*?)\n\}", hlo, re.S)
    body = b.group(1) if b else line
  if " convolution(" in body:
    window = re.search(r"window=\{size=(\w+)", body)
    size = window.group(1) if window else "?"
    if size in ("3x3", "2x2", "1x1"):  # 2x2: the CPU kernels' two-phase upsample conv
      return f"convolution forward / input-gradient ({size})"
    return "convolution weight-gradient"
  if " dot(" in body:
    return "dot"
  if name.startswith("ynn_fusion"):
    return "YNNPACK fusion (reduce / elementwise)"
  return name.split(".")[0]


def main(argv):
  del argv
  bench_setup.setup(FLAGS.config, FLAGS.cpu_devices)
  import jax  # pylint: disable=g-import-not-at-top

  config = FLAGS.config
  d = jax.local_device_count()
  if FLAGS.what == "train":
    fn, state, batch = bench_setup.train_step_and_inputs(config)
    compiled = fn.lower(state, batch).compile()
    args = [state, batch]

    def call():
      args[0], metrics = compiled(*args)
      return metrics

  else:
    compiled, args = bench_setup.compiled_forward(config)

    def call():
      return compiled(*args)

  for _ in range(2):
    jax.block_until_ready(call())
  with tempfile.TemporaryDirectory() as log_dir:
    start = time.perf_counter()
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for _ in range(FLAGS.calls):
        out = call()
      jax.block_until_ready(out)
    wall = (time.perf_counter() - start) / FLAGS.calls
    trace_file = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)[0]
    with gzip.open(trace_file) as f:
      events = json.load(f)["traceEvents"]
  hlo = compiled.as_text()
  per_op = collections.defaultdict(float)
  for e in events:
    if e.get("ph") != "X" or e["name"].startswith(_HOST_EVENTS):
      continue
    per_op[e["name"]] += e.get("dur", 0.0) / 1e3 / FLAGS.calls / d
  # Classified once per operation, not per event: each lookup searches the whole HLO text.
  totals = collections.defaultdict(float)
  for name, ms in per_op.items():
    totals[kind_of(name, hlo)] += ms
  for name, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[: FLAGS.ops]:
    m = re.search(r"\n\s*(?:ROOT )?%?" + re.escape(name) + r" = ([^\n]*)", hlo)
    print(f"{ms:8.2f} ms  {name}  {m.group(1)[:300] if m else ''}", file=sys.stderr)
  total = sum(totals.values())
  rows = sorted(totals.items(), key=lambda kv: -kv[1])
  print(f"{'ms/call/device':>14} {'share':>6}  kind", file=sys.stderr)
  for kind, ms in rows[: FLAGS.top]:
    print(f"{ms:14.1f} {100 * ms / total:5.1f}%  {kind}", file=sys.stderr)
  print(
      f"{total:14.1f} 100.0%  all operations (wall time of a call: {wall * 1e3:.1f} ms)",
      file=sys.stderr,
  )
  print(
      json.dumps(
          dict(
              what=FLAGS.what,
              devices=d,
              wall_ms=round(wall * 1e3, 2),
              ops_ms_per_device=round(total, 2),
              by_kind={k: round(v, 2) for k, v in rows},
          )
      )
  )


if __name__ == "__main__":
  app.run(main)
