#!/usr/bin/env bash
# Build .triton_seed/ (git-ignored) here, with network: the benchmarks' Triton kernels compiled ahead for the
# lent GPU, under that machine's Python and Triton (read 2026-11: Python 3.12, torch 2.11.0+cu130, Triton
# 3.6.0), so that Triton's cache keys match there. Carry it with gpu_check.sh: carry [".whl", ".triton_seed"].
# The environment (a venv of Python 3.12 with those wheels from PyPI, ~5 GB: PyPI's torch is a CUDA build)
# goes to $SEED_VENV (default /tmp/staged_fast_py312); the compile takes a few minutes on 2 cores.
#   bash benchmarks/triton_seed.sh
#   PY312=/usr/bin/python3.12 SEED_VENV=/scratch/py312 bash benchmarks/triton_seed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SEED_VENV:-/tmp/staged_fast_py312}
if [ ! -x "$VENV/bin/python" ]; then
  PY312=${PY312:-$(command -v python3.12 || ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python 2>/dev/null | tail -1 || true)}
  if [ -z "$PY312" ]; then
    echo "error: no Python 3.12 found (the GPU image's); set PY312=/path/to/python3.12" >&2
    exit 2
  fi
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.11.0 triton==3.6.0 numpy
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" benchmarks/triton_seed.py build --out .triton_seed "$@"
