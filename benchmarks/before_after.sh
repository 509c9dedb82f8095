#!/usr/bin/env bash
# Before/after throughput of two checkouts, alternating in one session (issue 22's bar).
#
#   benchmarks/before_after.sh OLD_TREE NEW_TREE [REPS [CASE ...]]
#
# CASE: cifar_train_b8, small_train_b32, small_sample_1000 (default: all three).
# OLD_TREE: a checkout of 7b4be3c (e.g. `git worktree add /tmp/old 7b4be3c`), whose
# benchmarks pick the C allocator and the kernels themselves; NEW_TREE: this version,
# run with --config.model.cpu_kernels=True and jemalloc preloaded when installed
# (apt install libjemalloc2). Prints one line per process: case, tree, rep, images/s.
set -euo pipefail
old=$(cd "$1" && pwd)
new=$(cd "$2" && pwd)
reps=${3:-2}
shift $(($# < 3 ? $# : 3))
selected=("$@")
((${#selected[@]})) || selected=(cifar_train_b8 small_train_b32 small_sample_1000)
py=${PYTHON:-python}
jemalloc=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
small=(--config.model.ch=32 "--config.model.ch_mult=(1,2,2)" --config.model.num_res_blocks=1)
declare -A cases=(
  [cifar_train_b8]="benchmarks/train_throughput.py --config=configs/cifar10.py --config.training.batch_size=8 --steps=5 --peak_tflops=1"
  [small_train_b32]="benchmarks/train_throughput.py --config=configs/cifar10.py --config.training.batch_size=32 --steps=8 --peak_tflops=1"
  [small_sample_1000]="benchmarks/sample_throughput.py --config=configs/cifar10.py --config.sampling.batch_size=16 --samplers=ancestral:0"
)
run() { # tree_name case
  local args extra=() env=()
  read -r -a args <<<"${cases[$2]}"
  [[ $2 == small_* ]] && extra+=("${small[@]}")
  if [[ $1 == new ]]; then
    extra+=(--config.model.cpu_kernels=True)
    [[ -f $jemalloc ]] && env=(LD_PRELOAD=$jemalloc MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1)
    (cd "$new" && env "${env[@]}" PYTHONPATH="$new" "$py" "${args[@]}" "${extra[@]}")
  else
    (cd "$old" && PYTHONPATH="$old" "$py" "${args[@]}" "${extra[@]}")
  fi 2>/dev/null | grep -o '"images_per_s": [0-9.]*' | tail -1
}
for rep in $(seq 1 "$reps"); do
  for c in "${selected[@]}"; do
    # the order alternates with the rep, so neither tree always runs first
    if ((rep % 2)); then order=(old new); else order=(new old); fi
    for tree in "${order[@]}"; do
      echo "$c $tree rep$rep $(run "$tree" "$c")"
    done
  done
done
