#!/usr/bin/env bash
# Install (see install.sh) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python -m pytest -q tests "$@"
