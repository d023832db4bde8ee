#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs everything, torch first and pinned.
# Usage: source scripts/setup_env.sh   (sets $PY to the venv's python)
# TORCH_INDEX_URL: where torch comes from. Unset: the plain pin from PyPI, which on Linux is the CUDA build
# (several GB of nvidia packages). A CPU-only machine: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, diffusers, transformers, peft, accelerate, pytest, importlib.util as u; assert all(u.find_spec(m) for m in ('open_clip', 'wandb', 'torchmetrics'))" 2>/dev/null; then
  echo "setup: installing packages (torch 2.13.0 first, then requirements-dev.txt)"
  "$PY" -m pip install -q --upgrade pip
  # torch first and pinned: an unpinned torch pulled in by another package would be a multi-GB CUDA build.
  "$PY" -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  "$PY" -m pip install -q -r "$ROOT/requirements-dev.txt"
  # Only for its CLIP BPE merge list (the offline tokenizer of the tiny test models); its deps pull torchvision.
  "$PY" -m pip install -q --no-deps open_clip_torch==3.3.0
fi
export PY
