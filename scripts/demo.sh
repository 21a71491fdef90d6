#!/usr/bin/env bash
# Install (see install.sh) and run the demo on the embedded default model: cached vs uncached, no download.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
cached-diffusers demo "$@"
