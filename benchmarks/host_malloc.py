"""The C allocators of ddpm_jax.host_malloc against each other, one process each, alternating.

  python benchmarks/host_malloc.py [--choices=system,glibc_thp,jemalloc] [--reps=3] -- \
      train_throughput.py --config=configs/cifar10.py --config.training.batch_size=8

Runs the benchmark script after ``--`` (train_throughput.py or
sample_throughput.py, with its arguments) once per choice and round, the
choices taking turns, each in a fresh process started with that allocator's
environment (``host_malloc.environment``; ``system`` is the process as
started). An allocator can only be chosen when a process starts, so this
cannot be an in-process A/B. Prints every JSON line it gets, then one summary
line: per choice the median images/s, its ratio to the first choice, the
median page faults per step (train_throughput.py) and the allocator the
process reported.
"""

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import bench_setup  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import host_malloc  # pylint: disable=g-import-not-at-top,wrong-import-position


def run(script_args, choice):
  env = dict(os.environ)
  env.pop(host_malloc.MARKER, None)
  env.update(host_malloc.environment(choice, env, host_malloc.find_jemalloc())
             or {host_malloc.MARKER: "system"})
  cmd = [sys.executable, os.path.join(HERE, script_args[0]), *script_args[1:]]
  result = bench_setup.run_json(cmd, env)
  print(json.dumps(dict(choice=choice, **result)), flush=True)
  return result


def main():
  parser = argparse.ArgumentParser(usage=__doc__)
  parser.add_argument("--choices", default="system,glibc_thp,jemalloc")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("script", nargs=argparse.REMAINDER,
                      help="-- then the benchmark script and its arguments")
  args = parser.parse_args()
  script = args.script[1:] if args.script[:1] == ["--"] else args.script
  if not script:
    parser.error("give the benchmark after --, e.g. -- train_throughput.py --config=...")
  choices = args.choices.split(",")
  if "jemalloc" in choices and not host_malloc.find_jemalloc():
    parser.error("libjemalloc.so.2 not found (apt install libjemalloc2), or leave jemalloc out")
  results = {c: [] for c in choices}
  for _ in range(args.reps):
    for c in choices:
      results[c].append(run(script, c))
  base = statistics.median(r["images_per_s"] for r in results[choices[0]])
  summary = {}
  for c, rs in results.items():
    ips = statistics.median(r["images_per_s"] for r in rs)
    summary[c] = dict(images_per_s=ips, ratio=round(ips / base, 3), malloc=rs[0].get("malloc"))
    if "page_faults_per_step" in rs[0]:
      summary[c]["page_faults_per_step"] = statistics.median(r["page_faults_per_step"] for r in rs)
  print(json.dumps(dict(reps=args.reps, script=" ".join(script), summary=summary)))


if __name__ == "__main__":
  main()
