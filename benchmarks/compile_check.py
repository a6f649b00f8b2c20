"""Compile every Triton launch that training makes for a GPU (sm_90a by default), on a machine without one.

The CPU tests run the kernels in Triton's interpreter, which executes the Python of a kernel and checks
little of what the real compiler checks (loop-carried types, constexpr rules, layouts, register and shared
memory limits). A kernel that passes every interpreted test can still fail to compile at the first step on
a GPU. This script runs a real training step on CPU tensors with the host code on its GPU branches (GPU
block sizes, 132 SMs) and every kernel launch turned into a compile for the target: Triton's own binder
derives each signature and specialisation from the actual arguments (tensor dtypes, 16-divisible sizes
and pointers), and the whole pipeline down to ptxas runs. Nothing executes, so outputs are garbage; the
point is only that each launch compiles. Autotuned kernels: every config the pruning keeps is compiled
(--first_config: only the first, faster).

Workloads (--workloads): a GPT-2 block at head_dim 64 (768/12), 96 (768/8) and 128 (1536/12), T = 1024,
vocabulary 50257, dropout 0.1, forward + backward + an eval forward, under autocast bf16 and fp16 and in
fp32, exact and with --tf32 (--dtypes); and the llama block (GQA, RMSNorm, RoPE, SwiGLU). Each also runs
attention's deterministic backward (split dQ: the dK/dV kernel without dQ, then the dQ kernel) at its shapes.

    python benchmarks/compile_check.py                         # everything, sm_90a
    python benchmarks/compile_check.py --workloads gpt2_hd64 --dtypes bf16 --first_config
    PYTHONPATH=/path/to/triton-3.6 python benchmarks/compile_check.py   # the GPU image's Triton
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be decorated for the GPU compiler
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from benchmarks.harness import print_table, write_json  # noqa: E402

H100_SMS = 132  # H100 SXM and H200: the norm backward sizes its grid by this
# Shared memory one block may use (bytes): a kernel over it compiles but fails to load (OutOfResources).
SHARED_LIMIT = {"90": 227 * 1024, "90a": 227 * 1024, "80": 163 * 1024}

WORKLOADS = {
    # name: GPTConfig fields (one block: every layer launches the same kernels)
    "gpt2_hd64": dict(n_embd=768, n_head=12),
    "gpt2_hd96": dict(n_embd=768, n_head=8),
    "gpt2_hd128": dict(n_embd=1536, n_head=12),
    "llama": dict(arch="llama", n_embd=768, n_head=12, n_kv_head=4),
}
# name: (autocast dtype or None, torch's fp32 matmul precision: "high" is the trainer's --tf32)
DTYPES = {"bf16": (torch.bfloat16, "highest"), "fp16": (torch.float16, "highest"), "fp32": (None, "highest"),
          "tf32": (None, "high")}


class CompileOnlyDriver:
    """What Triton's JIT asks the active driver for before a launch: a target, a device and a stream.
    With this driver active no GPU is needed, and the launch itself is never reached (see compile_only)."""

    def __init__(self, arch: str):
        self.target = GPUTarget("cuda", int(arch.rstrip("a")), 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class Recorder:
    def __init__(self, first_config: bool, ptxas_arch: str | None = None):
        self.first_config = first_config
        self.ptxas_arch = ptxas_arch  # set: registers and spills of each kernel from `ptxas -v`
        self.kernels: dict[tuple, dict] = {}  # one row per distinct compiled kernel
        self.configs_seen = 0
        self.tuning = False  # compiling an autotuner candidate (it may be dropped), not a launch
        self.workload, self.dtype = "", ""  # what is being stepped, for the rows

    def add(self, fn: JITFunction, kernel) -> None:
        meta = kernel.metadata
        key = (fn.__name__, kernel.hash)
        row = self.kernels.setdefault(key, {
            "kernel": fn.__name__, "workload": self.workload, "dtype": self.dtype, "role": "candidate",
            "warps": meta.num_warps, "stages": meta.num_stages, "shared": int(meta.shared or 0),
            "shared_KiB": round(int(meta.shared or 0) / 1024, 1), "constexprs": _constexprs(kernel)})
        if not self.tuning:
            row["role"] = "launch"
        if self.ptxas_arch and "regs" not in row:
            from benchmarks.kernel_resources import ptxas_usage

            row["regs"], row["spill_bytes"] = ptxas_usage(kernel.asm["ptx"], self.ptxas_arch)


def _constexprs(kernel) -> str:
    """The block sizes and flags a compiled kernel was specialised on, as 'NAME=value' pairs."""
    src = getattr(kernel, "src", None)
    values = getattr(src, "constants", None) or {}
    fn = getattr(src, "fn", None)
    names = [p.name for p in fn.params] if fn is not None else []
    pairs = []
    for path, value in values.items():
        index = path[0] if isinstance(path, tuple) else path
        name = names[index] if isinstance(index, int) and index < len(names) else str(index)
        if re.fullmatch(r"[A-Z0-9_]+", name):
            pairs.append(f"{name}={value}")
    return " ".join(pairs)


@contextlib.contextmanager
def compile_only(recorder: Recorder, arch: str):
    """Every JIT launch compiles (Triton's warmup path) and returns without running; the autotuner
    compiles each config it would time instead of timing it, and keeps the first."""
    run, bench = JITFunction.run, Autotuner._bench

    def compile_launch(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        recorder.add(self, kernel)
        return kernel

    def compile_config(self, *args, config, **kwargs):
        if not recorder.first_config:
            recorder.tuning = True
            try:  # kwargs hold grid and warmup: compiles only
                self.fn.run(*args, **kwargs, **config.all_kwargs())
            finally:
                recorder.tuning = False
        recorder.configs_seen += 1
        return [float(recorder.configs_seen)] * 3  # "timings" in call order: the first config kept wins

    active = driver._active  # None unless a driver was chosen: restored as found
    driver.set_active(CompileOnlyDriver(arch))
    JITFunction.run, Autotuner._bench = compile_launch, compile_config
    try:
        yield
    finally:
        JITFunction.run, Autotuner._bench = run, bench
        driver.set_active(active)


class HalfMatmulsInFloat(TorchDispatchMode):
    """fp16 matrix products computed in fp32 and rounded back to fp16. The CPU has no fast fp16 GEMM (~1
    GFLOP/s here: a GPT-2 step's LM head alone took 3 minutes); every dtype the kernels see is unchanged,
    and the values do not matter (the kernels only compile). The fused loss's custom ops are opaque to a
    dispatch mode (their bodies run with it off), so their Python body is run here with the mode on."""

    OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.matmul.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        half = any(isinstance(a, torch.Tensor) and a.dtype == torch.float16 for a in args)
        if half and func in self.OPS:
            upcast = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float16 else a for a in args]
            return func(*upcast, **kwargs).half()
        loss_op = func._schema.name
        if half and loss_op in ("staged_fast::linear_cross_entropy", "staged_fast::linear_cross_entropy_loss"):
            from staged_fast.kernels.fused_linear_ce import linear_cross_entropy_forward

            compute_grad = loss_op == "staged_fast::linear_cross_entropy"
            with self:
                out = linear_cross_entropy_forward(*args, **kwargs, compute_grad=compute_grad)
            return out if compute_grad else out[0]
        return func(*args, **kwargs)


def load_kernels_for_gpu() -> None:
    """Import the Triton modules compiled (not interpreted) and route the package's CPU tensors to them:
    the device checks accept CPU tensors and the grid sizing sees an H100's SMs."""
    from staged_fast import kernels
    from staged_fast.kernels import _common

    for name in kernels.TRITON_MODULES:
        module = kernels._LOADED[name] = importlib.import_module(f"staged_fast.kernels.{name}")
        if getattr(module, "INTERPRETED", False):
            raise SystemExit("compile_check: the kernels were imported under TRITON_INTERPRET; unset it.")
        if hasattr(module, "check_device"):
            module.check_device = lambda op, *tensors: None
        if hasattr(module, "num_sms"):
            module.num_sms = lambda device: H100_SMS
    _common.num_sms = lambda device: H100_SMS


def training_step(workload: str, dtype: torch.dtype | None, batch: int = 1) -> None:
    """One GPT / llama block at GPT-2 shapes: forward + backward in training mode (dropout on) and an
    eval forward with the loss (the no-gradient loss kernel, attention without dropout); then attention's
    deterministic backward (split dQ) at the block's shapes, and its fwd+bwd without dropout."""
    from staged_fast.config import GPTConfig
    from staged_fast.kernels import attention
    from staged_fast.model import GPT

    config = GPTConfig(n_layer=1, vocab_size=50257, n_positions=1024, dropout=0.1, attn_dropout=0.1,
                       **WORKLOADS[workload])
    torch.manual_seed(0)
    model = GPT(config, kernels_backend="triton")
    idx = torch.randint(0, config.vocab_size, (batch, 1024))
    targets = torch.randint(0, config.vocab_size, (batch, 1024))

    def autocast():
        return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()

    with HalfMatmulsInFloat():
        with autocast():
            loss = model(idx, targets)
        loss.backward()
        model.eval()
        with torch.no_grad(), autocast():
            model(idx, targets)
    # torch.use_deterministic_algorithms(True) trains with the split dQ backward: its two kernels, dropout on.
    head_dim, n_kv = config.n_embd // config.n_head, config.n_kv_head or config.n_head
    q = torch.randn(batch, config.n_head, 1024, head_dim, dtype=dtype or torch.float32, requires_grad=True)
    k, v = (torch.randn(batch, n_kv, 1024, head_dim, dtype=q.dtype, requires_grad=True) for _ in range(2))
    mode, attention.DQ_MODE = attention.DQ_MODE, "split"
    try:
        attention.flash_attention(q, k, v, config.attn_dropout).backward(torch.randn_like(q))
    finally:
        attention.DQ_MODE = mode
    # Attention fwd+bwd without dropout (what bench_kernels times beside the dropout rows).
    attention.flash_attention(q, k, v, 0.0).backward(torch.randn_like(q))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=None,
                    help="which models to step (default all)")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                    help="autocast bf16 / fp16, fp32 without autocast (exact dots), or tf32: fp32 with the "
                         "trainer's --tf32 (default all)")
    ap.add_argument("--pairs", nargs="+", default=None, metavar="WORKLOAD:DTYPE",
                    help="step exactly these workload:dtype pairs (e.g. gpt2_hd96:bf16 llama:fp16) instead of every "
                         "--workloads x --dtypes pair")
    ap.add_argument("--arch", default="90a", help="compute capability to compile for: 90a (H100/H200, default), 80, ...")
    ap.add_argument("--first_config", action="store_true",
                    help="compile only the first kept config of each autotuned kernel (faster)")
    ap.add_argument("--ptxas", action="store_true",
                    help="also report registers and spilled bytes per thread of each kernel (ptxas -v; slower)")
    ap.add_argument("--batch", type=int, default=1, help="sequences of 1024 tokens per step (default 1)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error(f"--batch {args.batch}: give at least 1")
    if not re.fullmatch(r"\d+a?", args.arch):
        ap.error(f"--arch {args.arch!r}: give a compute capability such as 90a or 80")
    if args.pairs is None:
        args.pairs = [(w, d) for w in args.workloads or WORKLOADS for d in args.dtypes or DTYPES]
    else:
        if args.workloads or args.dtypes:
            ap.error("--pairs names workload:dtype pairs itself: leave out --workloads and --dtypes")
        pairs = [p.partition(":")[::2] for p in args.pairs]
        bad = [p for p, (w, d) in zip(args.pairs, pairs) if w not in WORKLOADS or d not in DTYPES]
        if bad:
            ap.error(f"--pairs {' '.join(bad)}: give workload:dtype with a workload of {', '.join(WORKLOADS)} and a "
                     f"dtype of {', '.join(DTYPES)}")
        args.pairs = pairs
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    load_kernels_for_gpu()
    recorder = Recorder(args.first_config, args.arch if args.ptxas else None)
    failures = []
    print(f"Triton {triton.__version__}, torch {torch.__version__}: compiling every launch for sm_{args.arch} "
          f"(no GPU used)", flush=True)
    with compile_only(recorder, args.arch):
        for workload, dtype_name in args.pairs:
            recorder.workload, recorder.dtype = workload, dtype_name
            before, t0 = len(recorder.kernels), time.perf_counter()
            dtype, precision = DTYPES[dtype_name]
            before_precision = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(precision)
            try:
                training_step(workload, dtype, args.batch)
            except Exception as e:  # report every failing workload, not just the first
                failures.append(f"{workload} {dtype_name}: {type(e).__name__}: {str(e)[:2000]}")
                print(f"FAILED {failures[-1]}", flush=True)
                continue
            finally:
                torch.set_float32_matmul_precision(before_precision)
            print(f"{workload} {dtype_name}: {len(recorder.kernels) - before} new kernels compiled in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    rows = list(recorder.kernels.values())
    if rows:
        print()
        print_table(rows, ["kernel", "workload", "dtype", "role", "warps", "stages", "shared_KiB",
                           *(["regs", "spill_bytes"] if args.ptxas else []), "constexprs"])
    limit = SHARED_LIMIT.get(args.arch)
    for r in rows:
        if limit is not None and r["shared"] > limit:
            what = f"{r['kernel']} ({r['workload']} {r['dtype']}, {r['constexprs']}) needs {r['shared_KiB']} KiB " \
                   f"of shared memory, over sm_{args.arch}'s {limit // 1024} KiB"
            if r["role"] == "launch":  # the config that runs: it would fail to load on the GPU
                failures.append(what)
            else:  # the autotuner drops a config that fails to load (OutOfResources) and times the rest
                print(f"note: autotuner candidate dropped at load: {what}")
    if args.json:
        write_json(args.json, {"triton": triton.__version__, "arch": args.arch, "rows": rows, "failures": failures})
    if failures:
        print(f"\n{len(failures)} failure(s):\n" + "\n".join(failures), file=sys.stderr)
        return 1
    print(f"\nall {len(rows)} distinct kernels compiled for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
