#!/usr/bin/env bash
# Quickstart command 1: set up the environment and run the recipe on the shipped demo data (CPU, tiny model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RLHF=.venv/bin/rlhf
if [ ! -f outputs/demo/tiny-base/model.safetensors ]; then
  $RLHF init-tiny outputs/demo/tiny-base --corpus data/demo
fi
.venv/bin/accelerate launch --config_file configs/accelerate/cpu.yaml -m rlhf.sft --config configs/tiny/sft.yaml "$@"
