#!/usr/bin/env bash
# The accelerator checks, in one go (one GPU or TPU host): the train step of the paper
# config (batch 3, 64^3) in bfloat16 and float32, the default config, the real training
# loop of both (pipeline with the spatial warp on the device, prefetch, step) beside their
# bare step, the pyramid against the sum of its levels (each level timed alone beside it),
# tiled inference of a CT-sized volume, and the equivalence tests there.
#   bash benchmarks/accelerator_check.sh [RESULTS_DIR]
# Each part runs in its own process, so each reports its own peak device memory.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmark_results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
step() { python3 benchmarks/train_step.py --torch=false --steps=20 "$@" 2>&1 | grep -v Warning; }
{
  step --configs=paper --scopes=unet --paper_batch=3 --dtype=bfloat16 --end_to_end=
  step --configs=paper --scopes=pyramid --paper_batch=3 --dtype=bfloat16 --end_to_end=
  step --configs=paper --scopes=pyramid --paper_batch=3 --dtype=float32 --end_to_end=
  step --configs=default --scopes=pyramid --end_to_end=
  step --configs= --end_to_end=default,paper --paper_batch=3 --dtype=bfloat16 \
    --loop_steps=100 --paper_loop_steps=100
} | tee "$out/train_step.md"
if [ -f benchmarks/inference.py ]; then
  python3 benchmarks/inference.py --config paper --size 512 512 400 2>&1 | grep -v Warning \
    | tee "$out/inference.md"
fi
python3 -m pytest -q -p no:cacheprovider tests/test_conv.py tests/test_unet.py \
  tests/test_augment.py 2>&1 | tail -5 \
  | tee "$out/tests.txt"
