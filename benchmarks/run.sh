#!/usr/bin/env bash
# One command from a fresh clone: set up .venv (scripts/setup.sh), then compare our PPO with TRL 1.12's
# PPOTrainer and the bare-compute limit, plus the sweep (benchmarks/compare_trl.py; its first run creates
# benchmarks/.venv-trl112). Arguments go to compare_trl.py, e.g. --threads 1, --quick, --out-dir DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python benchmarks/compare_trl.py "$@"
