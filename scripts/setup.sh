#!/usr/bin/env bash
# Set up .venv on a fresh machine: CPU torch first (a bare torch requirement would pull a CUDA build),
# then the pinned dependencies, then staged_fast itself built against that torch (no build isolation,
# so the C++ extension's ABI matches the installed torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -r requirements.txt
python -m pip install -q --no-build-isolation -e .
