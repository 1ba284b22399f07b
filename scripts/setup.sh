#!/usr/bin/env bash
# Create (or reuse) .venv in the checkout (or $RLHF_VENV) and install rlhf into it; the other scripts run from it.
# Without an NVIDIA GPU we install a CPU build of torch: a plain `pip install torch` on Linux pulls several GB of
# CUDA packages. A CPU wheel already on disk (pip's find-links) is used first, then PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RLHF_VENV:-.venv}
TORCH_VERSION=${RLHF_TORCH_VERSION:-2.13.0}
EXTRAS=${RLHF_EXTRAS:-test,report,embeddings}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch==$TORCH_VERSION"  # the tested version, with the CUDA build pip picks for it
  else
    "$PY" -m pip install -q --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null \
      || "$PY" -m pip install -q --no-deps "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# Installs torch's own dependencies too; the torch requirement is already met, so no CUDA build is pulled.
"$PY" -m pip install -q -e ".[$EXTRAS]"
"$PY" -c "import torch, transformers, trl; print(f'rlhf environment ready: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}')"
