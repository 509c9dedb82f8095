"""C allocator settings against each other: a benchmark script in alternating processes.

  python benchmarks/cpu/host_malloc.py [--choices=system,glibc_thp,jemalloc] [--reps=3] -- \
      train_throughput.py --config=configs/cifar10.py --config.training.batch_size=8 \
      --config.model.cpu_kernels=True

Runs the benchmark script after ``--`` (train_throughput.py or
sample_throughput.py, with its arguments) once per choice and round, the
choices taking turns, each in a fresh process started with that choice's
environment (``bench_setup.malloc_environment``):

* ``system``: glibc's malloc as started;
* ``glibc_thp``: glibc with transparent huge pages
  (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, glibc 2.35+);
* ``jemalloc``: ``LD_PRELOAD=libjemalloc.so.2`` with
  ``MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1`` (keeps freed pages); left
  out of the default choices when the library is not found.

Prints every JSON line it gets, then one summary line: per choice the median
images/s, its ratio to the first choice, the median page faults per step and
the allocator the process reported (``malloc``).
"""

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
sys.path.insert(0, os.path.dirname(HERE))
from benchmarks import bench_setup  # pylint: disable=g-import-not-at-top,wrong-import-position


def run(script_args, choice):
  env = bench_setup.malloc_environment(choice)
  cmd = [sys.executable, os.path.join(HERE, script_args[0]), *script_args[1:]]
  result = bench_setup.run_json(cmd, env)
  print(json.dumps(dict(choice=choice, **result)), flush=True)
  return result


def main():
  parser = argparse.ArgumentParser(usage=__doc__)
  parser.add_argument(
      "--choices",
      default="",
      help=f"comma-separated, of {','.join(bench_setup.MALLOC_VARIANTS)} (default: all found)",
  )
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument(
      "script", nargs=argparse.REMAINDER, help="-- then the benchmark script and its arguments"
  )
  args = parser.parse_args()
  script = args.script[1:] if args.script[:1] == ["--"] else args.script
  if not script:
    parser.error("give the benchmark after --, e.g. -- train_throughput.py --config=...")
  from ddpm_jax.cpu import malloc  # pylint: disable=g-import-not-at-top

  jemalloc = malloc.find_jemalloc()
  if args.choices:
    choices = args.choices.split(",")
    unknown = [c for c in choices if c not in bench_setup.MALLOC_VARIANTS]
    if unknown:
      parser.error(f"unknown choices {unknown}; expected {bench_setup.MALLOC_VARIANTS}")
    if "jemalloc" in choices and not jemalloc:
      parser.error("libjemalloc.so.2 not found (apt install libjemalloc2), or leave jemalloc out")
  else:
    choices = [c for c in bench_setup.MALLOC_VARIANTS if c != "jemalloc" or jemalloc]
    if not jemalloc:
      print("libjemalloc.so.2 not found: jemalloc left out", file=sys.stderr)
  results = {c: [] for c in choices}
  for _ in range(args.reps):
    for c in choices:
      results[c].append(run(script, c))
  base = statistics.median(r["images_per_s"] for r in results[choices[0]])
  summary = {}
  for c, rs in results.items():
    ips = statistics.median(r["images_per_s"] for r in rs)
    summary[c] = dict(
        images_per_s=ips,
        ratio=round(ips / base, 3),
        malloc=rs[0].get("malloc"),
    )
    if "page_faults_per_step" in rs[0]:
      summary[c]["page_faults_per_step"] = statistics.median(r["page_faults_per_step"] for r in rs)
  print(json.dumps(dict(reps=args.reps, script=" ".join(script), summary=summary)))


if __name__ == "__main__":
  main()
