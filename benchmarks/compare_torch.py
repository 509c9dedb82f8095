"""Side-by-side CPU comparison with PyTorch + diffusers, alternating the two.

  python benchmarks/compare_torch.py --torch_python=/work/venv-torch/bin/python [--reps=3]

Runs, in alternation and `--reps` times each, our train step and the peer's for
the paper's CIFAR-10 U-Net (batch 8) and the 1.1M-parameter U-Net (ch 32,
ch_mult (1,2,2), one res block per level, attention at 16x16; batch 32), and
1000-step sampling of 16 images of the 1.1M model. Prints every JSON line it
gets, then one summary line per case and variant of ours: the medians and
our/peer images-per-s ratio. --dtype=bfloat16 runs both sides in bfloat16 compute (float32 weights).
Both train steps end with the paper's EMA of the weights (decay 0.9999), our
step's last part; --peer_ema_decay=0 leaves it out of the peer's step only.
Our side runs as configured (model.cpu_kernels is on by default: the CPU
kernels); --ours_cpu_kernels=False runs the plain Flax model instead, and a
list, e.g. --ours_cpu_kernels=default,False, runs each of our variants in turn
with the peer in every round. Ours starts as main.py does
(``ddpm_jax.host.setup``), the peer with the system's allocator, or with
--peer_malloc=glibc_thp|jemalloc that environment
(``bench_setup.malloc_environment``; a check that the allocator is not all of
the difference). The peer needs torch and diffusers (requirements-bench.txt) in the
interpreter given by --torch_python; the machine should be otherwise idle.
"""

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import bench_setup  # pylint: disable=g-import-not-at-top,wrong-import-position

SMALL = [
    "--config.model.ch=32",
    "--config.model.ch_mult=(1,2,2)",
    "--config.model.num_res_blocks=1",
]
CASES = {
    "cifar10_train": (
        [
            "train_throughput.py",
            "--config=configs/cifar10.py",
            "--config.training.batch_size=8",
            "--steps=5",
            "--warmup=1",
        ],
        ["--model=cifar10", "--mode=train", "--batch=8", "--reps=5", "--warmup=2"],
    ),
    "small_train": (
        [
            "train_throughput.py",
            "--config=configs/cifar10.py",
            "--config.training.batch_size=32",
            "--steps=10",
            *SMALL,
        ],
        ["--model=small", "--mode=train", "--batch=32", "--reps=10", "--warmup=3"],
    ),
    "small_sample1000": (
        [
            "sample_throughput.py",
            "--config=configs/cifar10.py",
            "--config.sampling.batch_size=16",
            "--samplers=ancestral:0",
            *SMALL,
        ],
        ["--model=small", "--mode=sample", "--num=16", "--steps=1000", "--reps=1"],
    ),
}


def run(cmd, env=None):
  result = bench_setup.run_json(cmd, env)
  print(json.dumps(result), flush=True)
  return result


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--torch_python", required=True)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument(
      "--dtype",
      choices=["float32", "bfloat16"],
      default="float32",
      help="compute dtype on both sides (ours: model.dtype; peer: torch.autocast)",
  )
  parser.add_argument(
      "--peer_ema_decay",
      type=float,
      default=0.9999,
      help="the peer's weight EMA in training; ours runs the config's (0.9999). "
      "0: the peer skips the EMA (our step still does it)",
  )
  parser.add_argument(
      "--peer_malloc",
      choices=["system", "glibc_thp", "jemalloc"],
      default="system",
      help="the peer process's C allocator (ours: as main.py sets it up)",
  )
  parser.add_argument(
      "--ours_cpu_kernels",
      default="default",
      help="our side's model.cpu_kernels: 'default' (as configured), True or False, or a "
      "comma-separated list of them, each run in every round",
  )
  args = parser.parse_args()
  try:
    peer_env = bench_setup.malloc_environment(args.peer_malloc)
  except ValueError as e:
    parser.error(str(e))
  variants = args.ours_cpu_kernels.split(",")
  for v in variants:
    if v.lower() not in ("default", "true", "false"):
      parser.error(f"--ours_cpu_kernels: {v!r} is not default, True or False")
  summary = []
  for case in args.cases.split(","):
    ours_cmd, peer_args = CASES[case]
    ours, peer = {v: [] for v in variants}, []
    if "--mode=train" in peer_args:
      peer_args = [*peer_args, f"--ema_decay={args.peer_ema_decay}"]
    for _ in range(args.reps):
      for v in variants:
        kernels = [] if v.lower() == "default" else [f"--config.model.cpu_kernels={v}"]
        ours[v].append(
            run(
                [
                    sys.executable,
                    os.path.join(HERE, ours_cmd[0]),
                    *ours_cmd[1:],
                    f"--config.model.dtype={args.dtype}",
                    *kernels,
                ]
            )
        )
      peer.append(
          run(
              [
                  args.torch_python,
                  os.path.join(HERE, "torch_peer.py"),
                  *peer_args,
                  f"--dtype={args.dtype}",
              ],
              env=peer_env,
          )
      )
    peer_ips = statistics.median(r["images_per_s"] for r in peer)
    for v in variants:
      ours_ips = statistics.median(r["images_per_s"] for r in ours[v])
      summary.append(
          dict(
              case=case,
              dtype=args.dtype,
              reps=args.reps,
              peer_malloc=args.peer_malloc,
              ours_cpu_kernels=v,
              ours_cpu_kernels_active=ours[v][0].get("cpu_kernels"),
              ours_malloc=ours[v][0].get("malloc"),
              ours_images_per_s=ours_ips,
              peer_images_per_s=peer_ips,
              ratio=round(ours_ips / peer_ips, 3),
          )
      )
  for s in summary:
    print(json.dumps(s))


if __name__ == "__main__":
  main()
