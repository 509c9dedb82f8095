#!/usr/bin/env bash
# The accelerator check of the performance issue, as one prepared script (run on a GPU/TPU host):
# CIFAR-10 train images/s and MFU at batch 128 in bfloat16 and float32, and the time to
# sample 256 images with the 1000-step ancestral sampler.
# Reference (the paper, TPU v3-8): 21 steps/s at batch 128 (~2,700 images/s); 256 samples in 17 s.
#   PEAK_TFLOPS=989 bash benchmarks/accelerator_check.sh     # H100/H200 dense bf16 peak
set -euo pipefail
cd "$(dirname "$0")/.."
peak="${PEAK_TFLOPS:-0}"
for dtype in bfloat16 float32; do
  python benchmarks/train_throughput.py --config=configs/cifar10.py --config.model.dtype=$dtype \
    --config.training.batch_size=128 --config.training.steps_per_call=4 \
    --config.training.log_every_steps=4 --config.training.checkpoint_every_steps=4 \
    --config.training.num_train_steps=8 --steps=20 --peak_tflops="$peak"
done
python benchmarks/sample_throughput.py --config=configs/cifar10.py --config.model.dtype=bfloat16 \
  --config.sampling.batch_size=256 --samplers=ancestral:0
