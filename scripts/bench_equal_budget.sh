#!/usr/bin/env bash
# Regenerates docs/equal-budget.md's numbers for one reference model (argument: qwenimage or flux2-klein):
#   1. LeMiCa's error matrix and schedules (`calibrate --method lemica`, budgets 25 17 10 of 50 steps, CFG 4),
#   2. MeanCache's windows on the same matrix (`calibrate --method meancache --error-matrix ...`),
#   3. the equal-budget comparison (`bench --equal-budget`), on held-out captions.
# Calibration and benchmark prompts are different captions of the training set. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
CLI="${CACHED_DIFFUSERS:-.venv/bin/cached-diffusers}"
NAME="${1:-qwenimage}"
MODEL="cached_diffusers/assets/reference-${NAME}-emoji"
OUT="benchmarks/equal-budget/${NAME}"
SAMPLING=(--model "$MODEL" --steps 50)
CALIBRATION_PROMPTS=(--prompt "ghost")
BENCH_PROMPTS=(--prompt "red apple" --prompt "rocket" --prompt "frog face" --prompt "full moon with face")
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
if [ ! -f "$OUT/lemica.error_matrix.json" ]; then
  "$CLI" calibrate "${SAMPLING[@]}" --method lemica --budget 25 17 10 --max-span 6 "${CALIBRATION_PROMPTS[@]}" \
      --output "$OUT/lemica.json" --quiet
fi
if [ ! -f "$OUT/meancache.calibration.json" ]; then
  "$CLI" calibrate "${SAMPLING[@]}" --method meancache --budget 25 17 10 --error-matrix "$OUT/lemica.error_matrix.json" \
      "${CALIBRATION_PROMPTS[@]}" --output "$OUT/meancache.json" --quiet
fi
"$CLI" bench "${SAMPLING[@]}" "${BENCH_PROMPTS[@]}" --equal-budget 25 17 10 \
    --planned "$OUT"/lemica-b*.json "$OUT"/meancache-b*.json --calibrated "$OUT/../../reference-model/magcache_config.json" \
    --threads 1 --output-dir "$OUT" --quiet "$@"
