#!/usr/bin/env bash
# One command from a fresh clone: set up .venv (scripts/setup.sh), then compare our PPO with TRL 1.12's
# PPOTrainer and the bare-compute limit in the fixed configuration (plus the sweep) and the realistic one (answers
# that end at EOS) with benchmarks/compare_trl.py. Its first run creates benchmarks/.venv-trl112, and later runs
# reuse it when it holds trl 1.12.0. Arguments go to compare_trl.py, e.g. --threads 1, --quick, --out-dir DIR,
# --config realistic, --device cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${RLHF_VENV:-.venv}/bin/python" benchmarks/compare_trl.py "$@"
