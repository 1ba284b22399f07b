#!/usr/bin/env bash
# Quickstart command 2: set up the environment and run the whole test suite (CPU, tiny models, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "${RLHF_VENV:-.venv}/bin/python" -m pytest -q "$@"
