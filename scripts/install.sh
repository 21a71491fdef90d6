#!/usr/bin/env bash
# Create .venv and install cached-diffusers with its test dependencies.
# torch 2.13.0 is installed first, on its own, so that pip never resolves a bare `torch` requirement to the
# registry's newest build (gigabytes of CUDA wheels); on a GPU machine with torch already installed it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
