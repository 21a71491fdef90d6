#!/usr/bin/env bash
# Regenerates the equal-budget comparison of docs/equal-budget.md for one reference model (argument: qwenimage or
# flux2-klein), at 50 steps with CFG 4 (the model's generation_defaults.json for size and CFG):
#   1. LeMiCa's error matrix and schedules (`calibrate --method lemica`, budgets 25 17 10, edges up to 6 steps),
#   2. MeanCache's windows on the same matrix (`calibrate --method meancache --error-matrix ...`),
#   3. for FLUX.2 [klein], which ships none, TeaCache coefficients and MagCache ratios (`calibrate`),
#   4. the equal-budget comparison (`bench --equal-budget 25 17 10`) on held-out captions.
# Calibration uses one training caption, the comparison two others. Steps already done (files present) are skipped.
# Takes about an hour per model on this project's shared 2-core CPU. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
CLI="${CACHED_DIFFUSERS:-.venv/bin/cached-diffusers}"
NAME="${1:-qwenimage}"
shift || true
MODEL="cached_diffusers/assets/reference-${NAME}-emoji"
OUT="benchmarks/equal-budget/${NAME}"
SAMPLING=(--model "$MODEL" --steps 50)
CALIBRATION_PROMPTS=(--prompt "ghost")
BENCH_PROMPTS=(--prompt "red apple" --prompt "rocket")
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
[ -f "$OUT/lemica.error_matrix.json" ] || "$CLI" calibrate "${SAMPLING[@]}" --method lemica --budget 25 17 10 \
    --max-span 6 "${CALIBRATION_PROMPTS[@]}" --output "$OUT/lemica.json" --quiet
[ -f "$OUT/meancache.calibration.json" ] || "$CLI" calibrate "${SAMPLING[@]}" --method meancache --budget 25 17 10 \
    --error-matrix "$OUT/lemica.error_matrix.json" "${CALIBRATION_PROMPTS[@]}" --output "$OUT/meancache.json" --quiet
if [ "$NAME" = qwenimage ]; then  # the shipped TeaCache config and the reference benchmark's MagCache ratios
  CALIBRATED=(--calibrated "$MODEL/cache_config.json" --calibrated benchmarks/reference-model/magcache_config.json)
else
  for METHOD in teacache magcache; do
    [ -f "$OUT/$METHOD.json" ] || "$CLI" calibrate "${SAMPLING[@]}" --method "$METHOD" --prompt "ghost" \
        --prompt "snowman" --output "$OUT/$METHOD.json" --quiet
  done
  CALIBRATED=(--calibrated "$OUT/teacache.json" --calibrated "$OUT/magcache.json")
fi
"$CLI" bench "${SAMPLING[@]}" "${BENCH_PROMPTS[@]}" --equal-budget 25 17 10 --iterations 5 \
    --planned "$OUT"/lemica-b*.json "$OUT"/meancache-b*.json "${CALIBRATED[@]}" \
    --threads 1 --output-dir "$OUT" --quiet "$@"
