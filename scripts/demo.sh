#!/usr/bin/env bash
# Quickstart command 1: set up the environment and run the whole recipe (SFT -> reward model -> PPO -> report)
# on the shipped demo data with a tiny model, on CPU. Output: outputs/demo/{sft,reward,ppo}/ and report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${RLHF_VENV:-.venv}/bin/rlhf" pipeline --config configs/demo/pipeline.yaml "$@"
