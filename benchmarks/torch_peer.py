"""PyTorch peer for the CPU benchmark: diffusers' UNet2DModel in the DDPM configurations.

Standalone (does not import ddpm_jax). Runs in a separate venv that holds torch + diffusers,
see requirements-bench.txt:

    python3 -m venv /work/venv-torch
    /work/venv-torch/bin/pip install -r requirements-bench.txt
    /work/venv-torch/bin/python benchmarks/torch_peer.py --model=cifar10 --mode=train --batch=8
    /work/venv-torch/bin/python benchmarks/torch_peer.py --model=small --mode=train --batch=32
    /work/venv-torch/bin/python benchmarks/torch_peer.py --model=small --mode=sample --num=16 --steps=1000

Modes:
  train   one DDPM training step (Algorithm 1): t ~ U{0..999}, eps ~ N(0, I),
          x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (linear betas 1e-4..0.02),
          loss = MSE(eps_theta(x_t, t), eps), backward, grad-norm clip 1.0, Adam(lr=2e-4) step,
          then the EMA of the weights (--ema_decay, the paper's 0.9999; 0 turns it off), as in
          our train step; model.train() (dropout on). x0 is random in [-1, 1].
          --warmup untimed steps, then --reps timed steps; median_s is the median step time.
  sample  ancestral sampling (Algorithm 2) as a plain Python loop calling the model once per
          step, like diffusers' DDPMPipeline, with DDPMScheduler(variance_type="fixed_large",
          clip_sample=True) (sigma_t^2 = beta_t, x0 clipped to [-1, 1]); eval mode, inference_mode.
          --warmup untimed model calls, then --reps timed full loops; median_s is the median loop time.
  --dtype=bfloat16 runs the model call under torch.autocast (bfloat16 compute, float32
  weights, optimizer and sampler state), the counterpart of our model.dtype='bfloat16'.

Prints progress and the parameter count on stderr and one JSON line on stdout.

Noise: measure on an otherwise idle machine. With --threads=cores and other processes busy on
the same cores, torch's OpenMP threads spin-wait at every barrier and a step can get 4-10x
slower (not just 2x); OMP_WAIT_POLICY=PASSIVE in the environment (recorded in the JSON) avoids
most of that blow-up, at some cost when the machine is idle.
"""

import argparse
import json
import os
import statistics
import sys
import time

# The U-Net needs nothing from torchvision, but diffusers imports it when it is installed
# (diffusers/models/transformers/transformer_cosmos.py), and a torchvision build that does not
# match torch fails at import ("operator torchvision::nms does not exist"). Hide it: with
# sys.modules["torchvision"] = None, importlib.util.find_spec("torchvision") returns None and
# diffusers treats torchvision as absent.
if os.environ.get("TORCH_PEER_ALLOW_TORCHVISION") != "1":
  sys.modules["torchvision"] = None

import numpy as np  # noqa: E402
import torch  # noqa: E402
import diffusers  # noqa: E402
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402

# Settings shared by both models (those of the paper's CIFAR-10 model / google/ddpm-cifar10-32).
COMMON = dict(
    in_channels=3,
    out_channels=3,
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
    norm_eps=1e-6,
    norm_num_groups=32,
    attention_head_dim=None,  # one head with the full channel width, as in the paper
    dropout=0.1,
    act_fn="silu",
    resnet_time_scale_shift="default",
    add_attention=True,  # attention in the middle block
)

MODELS = {
    # The paper's CIFAR-10 U-Net (35.7M parameters).
    "cifar10": dict(
        sample_size=32,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
    # Small U-Net (~1.1M parameters), attention at 16x16 for 32x32 inputs.
    "small": dict(
        sample_size=32,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
}

NUM_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02


def log(*args):
  print(*args, file=sys.stderr, flush=True)


def default_threads():
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def build_model(name, image_size=None):
  cfg = dict(COMMON)
  cfg.update(MODELS[name])
  if image_size is not None:
    cfg["sample_size"] = image_size
  return UNet2DModel(**cfg)


def autocast(args):
  """bfloat16 autocast around the model call (weights and optimizer stay float32), or nothing."""
  return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")


def count_params(model):
  return sum(p.numel() for p in model.parameters())


def bench_train(model, args, size):
  betas = torch.linspace(BETA_START, BETA_END, NUM_TIMESTEPS, dtype=torch.float64)
  alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
  sqrt_ab = alphas_cumprod.sqrt().float()
  sqrt_1mab = (1.0 - alphas_cumprod).sqrt().float()

  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.Adam(params, lr=2e-4)
  ema = [p.detach().clone() for p in params] if args.ema_decay > 0 else None
  b = args.batch

  def step():
    x0 = torch.rand(b, 3, size, size) * 2.0 - 1.0  # random "images" in [-1, 1]
    t = torch.randint(0, NUM_TIMESTEPS, (b,))
    eps = torch.randn_like(x0)
    x_t = sqrt_ab[t].view(b, 1, 1, 1) * x0 + sqrt_1mab[t].view(b, 1, 1, 1) * eps
    with autocast(args):
      eps_pred = model(x_t, t).sample.float()
    loss = torch.nn.functional.mse_loss(eps_pred, eps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if ema is not None:  # ema <- decay * ema + (1 - decay) * p, multi-tensor like Adam's
      with torch.no_grad():
        torch._foreach_lerp_(ema, params, 1.0 - args.ema_decay)
    return loss.item()

  for i in range(args.warmup):
    t0 = time.perf_counter()
    loss = step()
    log(f"warmup {i}: {time.perf_counter() - t0:.3f}s loss={loss:.4f}")
  times = []
  for i in range(args.reps):
    t0 = time.perf_counter()
    loss = step()
    dt = time.perf_counter() - t0
    times.append(dt)
    log(f"step {i}: {dt:.3f}s loss={loss:.4f}")
  return times, b


def bench_sample(model, args, size):
  scheduler = DDPMScheduler(
      num_train_timesteps=NUM_TIMESTEPS,
      beta_start=BETA_START,
      beta_end=BETA_END,
      beta_schedule="linear",
      variance_type="fixed_large",
      clip_sample=True,
      prediction_type="epsilon",
  )
  scheduler.set_timesteps(args.steps)
  model.eval()
  n = args.num
  gen = torch.Generator().manual_seed(args.seed)

  with torch.inference_mode():
    x = torch.randn(n, 3, size, size, generator=gen)
    for i in range(args.warmup):
      t0 = time.perf_counter()
      with autocast(args):
        model(x, scheduler.timesteps[0]).sample
      log(f"warmup call {i}: {time.perf_counter() - t0:.3f}s")

    times, step_times = [], []
    for r in range(args.reps):
      t0 = time.perf_counter()
      x = torch.randn(n, 3, size, size, generator=gen)
      ts = t0
      for t in scheduler.timesteps:  # a plain Python loop, one model call per step
        with autocast(args):
          eps = model(x, t).sample.float()
        x = scheduler.step(eps, t, x, generator=gen).prev_sample
        te = time.perf_counter()
        step_times.append(te - ts)
        ts = te
      images = (x / 2 + 0.5).clamp(0, 1)
      dt = time.perf_counter() - t0
      times.append(dt)
      log(
          f"rep {r}: {dt:.2f}s for {len(scheduler.timesteps)} steps x {n} images "
          f"({dt / len(scheduler.timesteps) * 1e3:.1f} ms/step); "
          f"out range [{images.min().item():.3f}, {images.max().item():.3f}]"
      )
  return times, n, step_times


def main(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--model", choices=sorted(MODELS), default="cifar10")
  p.add_argument("--mode", choices=["train", "sample"], default="train")
  p.add_argument("--batch", type=int, default=8, help="train batch size")
  p.add_argument("--num", type=int, default=16, help="images to sample")
  p.add_argument("--steps", type=int, default=NUM_TIMESTEPS, help="sampling steps (<= 1000)")
  p.add_argument(
      "--threads",
      type=int,
      default=default_threads(),
      help="torch.set_num_threads (default: cores)",
  )
  p.add_argument(
      "--reps", type=int, default=None, help="timed iterations (default: train 5, sample 1)"
  )
  p.add_argument(
      "--warmup",
      type=int,
      default=None,
      help="untimed iterations (default: train 3, sample 3 calls)",
  )
  p.add_argument("--image-size", type=int, default=None, help="override sample_size (default 32)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
      "--dtype",
      choices=["float32", "bfloat16"],
      default="float32",
      help="compute dtype of the model call (bfloat16: torch.autocast, float32 weights)",
  )
  p.add_argument(
      "--ema_decay",
      type=float,
      default=0.9999,
      help="train: EMA of the weights after each step, as ours (0: no EMA)",
  )
  args = p.parse_args(argv)
  if args.reps is None:
    args.reps = 5 if args.mode == "train" else 1
  if args.warmup is None:
    args.warmup = 3
  if not 1 <= args.steps <= NUM_TIMESTEPS:
    p.error(f"--steps must be in [1, {NUM_TIMESTEPS}]")
  if not 0.0 <= args.ema_decay < 1.0:
    p.error("--ema_decay must be in [0, 1)")
  if args.reps < 1:
    p.error("--reps must be >= 1")

  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  np.random.seed(args.seed)

  model = build_model(args.model, args.image_size)
  size = model.config.sample_size
  params = count_params(model)
  log(
      f"torch {torch.__version__}, diffusers {diffusers.__version__}, threads {torch.get_num_threads()}; "
      f"model {args.model}: {params:,} parameters"
  )

  if args.mode == "train":
    times, per_iter = bench_train(model, args, size)
    step_times = None
  else:
    times, per_iter, step_times = bench_sample(model, args, size)

  med = statistics.median(times)
  out = {
      "framework": "torch",
      "torch_version": torch.__version__,
      "diffusers_version": diffusers.__version__,
      "model": args.model,
      "mode": args.mode,
      "batch": per_iter,
      "threads": torch.get_num_threads(),
      "params": params,
      "dtype": args.dtype,
      "ema_decay": args.ema_decay if args.mode == "train" else None,
      "median_s": round(med, 6),
      "images_per_s": round(per_iter / med, 4),
      "reps": args.reps,
      "all_times": [round(t, 6) for t in times],
      "steps": args.steps if args.mode == "sample" else None,
      "warmup": args.warmup,
      "loadavg_1m": round(os.getloadavg()[0], 2),
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
  }
  if step_times:
    # Per-step view of the sampling loop: less sensitive to bursts of load from other
    # processes than the total; est_total_s = median step time x steps.
    med_step = statistics.median(step_times)
    out["median_step_s"] = round(med_step, 6)
    out["est_total_s"] = round(med_step * args.steps, 3)
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
