#!/usr/bin/env bash
# One prepared check for a lent GPU machine (H100/H200 with torch + Triton + nvcc preinstalled; no
# network). About 8 minutes, 15 at worst; every step has its own timeout so one hang cannot eat the
# budget, and the steps run in priority order (a cut-off run loses the least important ones).
#
#   bash benchmarks/gpu_check.sh            # from the repository root; outputs under $OUT (or ./gpu_check_out)
#
# Steps: environment; build the package and its CUDA extension against the installed torch (no deps,
# no torch reinstall); the kernel tests on CUDA (compiled, bigger shapes); bench_kernels --quick;
# bench_train --quick (GPT2_base, bf16, ours vs HF GPT-2 with SDPA); bench_growth --quick if present;
# the rest of the test suite; then a summary table. Copy the tables, card and date into RESULTS.md.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT_DIR"
unset TRITON_INTERPRET  # compile the kernels for the GPU
export PYTHONUNBUFFERED=1
SUMMARY=()

step() {  # step NAME SECONDS CMD...: run with a timeout, log to $OUT_DIR/NAME.log, record rc and time
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=15 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  tail -n 25 "$OUT_DIR/$name.log"
  local status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT"; elif [ "$rc" -ne 0 ]; then status="FAIL($rc)"; fi
  SUMMARY+=("$(printf '%-16s %-10s %5ss' "$name" "$status" "$took")")
}

step env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv;
  python -c "import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name())";
  python -c "import transformers; print(\"transformers\", transformers.__version__)" || echo "transformers missing: bench_train will fail";
  python -c "import liger_kernel; print(\"liger_kernel present\")" || echo "liger_kernel missing: its rows are skipped";
  date -u'
step install 240 python -m pip install --no-build-isolation --no-deps -e .
step tests_kernels 180 python -m pytest -q -x tests/test_kernels_layer_norm.py tests/test_kernels_attention.py \
  tests/test_kernels_linear_ce.py tests/test_kernels_model.py
step bench_kernels 150 python benchmarks/bench_kernels.py --quick --json "$OUT_DIR/bench_kernels.json"
step bench_train 120 python benchmarks/bench_train.py --quick --json "$OUT_DIR/bench_train.json"
if [ -f benchmarks/bench_growth.py ]; then
  step bench_growth 60 python benchmarks/bench_growth.py --quick --device cuda --json "$OUT_DIR/bench_growth.json"
fi
step tests_rest 120 python -m pytest -q -x tests --ignore=tests/test_kernels_layer_norm.py \
  --ignore=tests/test_kernels_attention.py --ignore=tests/test_kernels_linear_ce.py --ignore=tests/test_kernels_model.py

echo
echo "=== summary ($(date -u '+%Y-%m-%d %H:%M UTC'), outputs in $OUT_DIR)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT_DIR/summary.txt"
echo
echo "--- bench_kernels (fwd+bwd rows)"
grep -E '^kernel|fwd\+bwd' "$OUT_DIR/bench_kernels.log" | tee -a "$OUT_DIR/summary.txt" || true
echo "--- bench_train"
sed -n '/^model /,$p' "$OUT_DIR/bench_train.log" | tee -a "$OUT_DIR/summary.txt" || true
