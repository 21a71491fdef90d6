#!/usr/bin/env bash
# Runs `cached-diffusers tune` of docs/tuning.md on one reference model (argument: qwenimage or flux2-klein) for the
# targets 40, 35 and 30 dB, at 50 steps with CFG 4 (the model's generation_defaults.json for size and CFG), with the
# defaults: the 8 built-in tuning prompts (DEFAULT_TUNING_PROMPTS), the built-in held-out prompts ("dog face",
# "sun with face", "snowman", "cat face"), seed 0 and `--margin auto` (the 99 % prediction bound of the tuning PSNRs
# held to the target). Nothing is chosen per target. The planned methods solve their budgets from the error matrix of
# the equal-budget comparison (measured on another caption, "ghost"); TeaCache / MagCache take the calibrated data that
# comparison used. Every run measures the wall-time speedup (`--measure-latency 5`); the 35 dB run also measures every
# method's published default setting (`--compare-defaults`). Outputs: benchmarks/tuning/<model>$TAG/psnr<T>/; extra
# arguments go to every run (e.g. `TAG=-margin2 bash scripts/tune_reference_models.sh qwenimage --margin 2`).
set -euo pipefail
cd "$(dirname "$0")/.."
CLI="${CACHED_DIFFUSERS:-.venv/bin/cached-diffusers}"
NAME="${1:-qwenimage}"
shift || true
MODEL="cached_diffusers/assets/reference-${NAME}-emoji"
EB="benchmarks/equal-budget/${NAME}"
if [ "$NAME" = qwenimage ]; then  # the shipped cache_config.json holds TeaCache's coefficients
  CALIBRATED=(--calibrated benchmarks/reference-model/magcache_config.json)
else
  CALIBRATED=(--calibrated "$EB/teacache.json" --calibrated "$EB/magcache.json")
fi
export OMP_NUM_THREADS=1
for TARGET in ${TARGETS:-40 35 30}; do
  OUT="benchmarks/tuning/${NAME}${TAG:-}/psnr${TARGET}"
  mkdir -p "$OUT"
  DEFAULTS=()
  [ "$TARGET" = 35 ] && DEFAULTS=(--compare-defaults)
  "$CLI" tune --model "$MODEL" --target-psnr "$TARGET" --steps 50 --error-matrix "$EB/lemica.error_matrix.json" \
      "${CALIBRATED[@]}" --measure-latency 5 "${DEFAULTS[@]}" --threads 1 --output "$OUT" --overwrite "$@" \
      > "$OUT/tune.log" 2> "$OUT/progress.log"
  tail -n 12 "$OUT/tune.log"
done
