#!/usr/bin/env bash
# Compile-only check of the CUDA kernels with nvcc against the installed torch's headers (~40 s).
# Usage: bash csrc/nvcc_check.sh [arch, default 90]
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH="${1:-90}"
INC=$(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
PYINC=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
ABI=$(python -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
OUT=$(mktemp -d)
nvcc -c csrc/grow_cuda.cu -o "$OUT/grow_cuda.o" $INC -I"$PYINC" -Icsrc -std=c++20 -D_GLIBCXX_USE_CXX11_ABI="$ABI" \
  --expt-relaxed-constexpr -gencode "arch=compute_${ARCH},code=sm_${ARCH}" -Xcompiler -fPIC -w
echo "nvcc compile check passed: csrc/grow_cuda.cu (sm_${ARCH})"
rm -rf "$OUT"
