#!/usr/bin/env bash
# Creates .venv (if needed) and installs charrnn into it. Sourced by quickstart.sh and test.sh.
# torch is installed first as the pinned CPU-friendly build (CHARRNN_TORCH overrides the spec), so that the
# unpinned `torch>=2.2` of pyproject.toml never pulls a multi-GB CUDA build; extras come from $1 (e.g. "[dev]").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "${CHARRNN_TORCH:-torch==2.13.0}"
python -m pip install -q -e ".${1:-}"
