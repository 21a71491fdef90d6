#!/usr/bin/env bash
# Regenerates what the README reports for the reference model (cached_diffusers/assets/reference-qwenimage-emoji):
#   1. its shipped TeaCache config (`calibrate` into benchmarks/reference-model/, then copied with its provenance
#      file beside model_index.json: calibrate itself never writes into the package's shipped models),
#   2. its MagCache ratios (`calibrate --method magcache`, into benchmarks/reference-model/),
#   3. the speed-versus-fidelity benchmark of every method (`bench`: results.json, results.md, pareto.png).
# Calibration and benchmark prompts are different captions of the training set. Run from anywhere, after
# `bash scripts/install.sh`; takes about 15 minutes on 2 CPU cores. Extra arguments go to `bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
CLI="${CACHED_DIFFUSERS:-.venv/bin/cached-diffusers}"
MODEL=cached_diffusers/assets/reference-qwenimage-emoji
OUT=benchmarks/reference-model
SAMPLING=(--model "$MODEL" --negative-prompt " " --true-cfg-scale 4 --steps 50 --height 32 --width 32)
CALIBRATION_PROMPTS=(--prompt "white smiling face" --prompt "dragon face" --prompt "pig face" --prompt "ghost"
                     --prompt "snowman" --prompt "winking face" --prompt "unicorn face" --prompt "zebra face")
BENCH_PROMPTS=(--prompt "red apple" --prompt "dog face" --prompt "rocket" --prompt "sun with face"
               --prompt "frog face" --prompt "wolf face" --prompt "full moon with face" --prompt "hugging face")
mkdir -p "$OUT"
OMP_NUM_THREADS=1 "$CLI" calibrate "${SAMPLING[@]}" --method teacache "${CALIBRATION_PROMPTS[@]}" --quiet \
    --output "$OUT/teacache_config.json" --overwrite
cp "$OUT/teacache_config.json" "$MODEL/cache_config.json"
cp "$OUT/teacache_config.calibration.json" "$MODEL/cache_config.calibration.json"
OMP_NUM_THREADS=1 "$CLI" calibrate "${SAMPLING[@]}" --method magcache "${CALIBRATION_PROMPTS[@]}" --quiet \
    --output "$OUT/magcache_config.json" --overwrite
OMP_NUM_THREADS=1 "$CLI" bench "${SAMPLING[@]}" "${BENCH_PROMPTS[@]}" --calibrated "$OUT/magcache_config.json" \
    --threads 1 --repeats 3 --output-dir "$OUT" --quiet "$@"
