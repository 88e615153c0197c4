#!/usr/bin/env bash
# Pyramid-depth and context-mode ablation, run one after another on this machine.
#
#   bash launch/ablation_local.sh [CONFIG] [RUNS_DIR] [extra --config.x=y overrides ...]
#
# Each run gets its own workdir RUNS_DIR/levels{S}_{mode}; rerunning resumes unfinished
# runs from their checkpoints and re-evaluates finished ones. Every run's Dice table is
# in RUNS_DIR/*/eval_summary.md.
set -euo pipefail
config="${1:-configs/default.py}"
runs="${2:-runs/ablation}"
shift $(( $# > 2 ? 2 : $# ))
python="${PYTHON:-python}"

for levels in 1 2 3; do
  for mode in end_to_end stagewise none; do
    # With one level there is no context, so the three modes are the same run.
    if [[ "$levels" == 1 && "$mode" != end_to_end ]]; then continue; fi
    workdir="$runs/levels${levels}_${mode}"
    echo "== pyramid.levels=$levels pyramid.mode=$mode -> $workdir"
    "$python" -m autocontext_jax.main --config "$config" --workdir "$workdir" \
      --config.pyramid.levels="$levels" --config.pyramid.mode="$mode" "$@"
  done
done
for table in "$runs"/*/eval_summary.md; do
  echo "== $(dirname "$table")"
  cat "$table"
done
