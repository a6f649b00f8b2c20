"""Claim: our Triton LayerNorm, causal flash attention and fused linear+CE are fast on GPT-2 shapes.

For each kernel and shape: forward, backward and forward+backward time of our kernel and its baselines
(PyTorch eager; SDPA's flash backend for attention; Liger-Kernel's LayerNorm and fused linear CE when
installed), in physical units (GB/s for LayerNorm, TFLOP/s for attention and the LM head) and as a
fraction of this device's peaks measured in the same run (a large copy; a large bf16 matmul), plus
the speed ratio to the baseline (baseline ms / our ms: > 1 is faster) and, for the LM-head loss, the
peak memory of fused vs unfused. Every implementation is validated against a reference before timing.

Goals on H100 (issue 4): LayerNorm fwd+bwd >= 80% of measured bandwidth and faster than torch at hidden
768-1536; attention fwd+bwd >= 0.9x SDPA flash at head_dim 64/128 (and it serves head_dim 96); fused CE
peak memory <= 1/4 of unfused at equal or better speed. Grouped-query attention (issue 13, shape
B x n_head/n_kv x T x hd) is timed against SDPA with enable_gqa=True and against our kernel on repeated K/V.
On CPU the group linear_ce_cpu times the torch backend's CPU training path for the LM-head loss (transposed
logits, gradient in the forward: staged_fast/kernels/cpu_linear_ce.py) against F.linear + F.cross_entropy at
real GPT-2 shapes (plain PyTorch ops, so no interpreter is involved and the times mean something).

    python benchmarks/bench_kernels.py                  # GPU, GPT-2 shapes (~2-4 min on an H100)
    python benchmarks/bench_kernels.py --quick          # GPU, fewer shapes
    python benchmarks/bench_kernels.py --quick --device cpu   # toy shapes under the Triton interpreter:
                                                               # proves the script runs; times mean nothing
    python benchmarks/bench_kernels.py --device cpu --only linear_ce_cpu   # the CPU LM-head loss, real shapes
Notes: the fused CE computes its gradients inside the forward (so its "bwd" is a scaling only and its
fwd includes the gradient matmuls); compare fwd+bwd. Backward alone is timed with retain_graph.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from staged_fast.cli_help import HelpFormatter  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (interpreter)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="input dtype of the kernels (GPU)")
    p.add_argument("--only", default="all", help="comma-separated groups of " + ", ".join(GROUPS) + " (default all)")
    p.add_argument("--json", default=None, help="also write the rows and provenance to this JSON file")
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(GROUPS) - {"all"}
    if unknown:
        p.error(f"--only: unknown group(s) {sorted(unknown)}; choose from {', '.join(GROUPS)}")
    return args


GROUPS = ("layer_norm", "attention", "attention_dq", "linear_ce", "llama", "linear_ce_cpu")


ARGS = parse_args()
import torch  # noqa: E402

DEVICE = torch.device(ARGS.device or ("cuda" if torch.cuda.is_available() else "cpu"))
if DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported

import torch.nn.functional as F  # noqa: E402

from benchmarks.harness import peak_memory_cuda, print_table, provenance, time_fn, time_kernel, write_json  # noqa: E402
from staged_fast.kernels._common import assert_within_torch_error  # noqa: E402
from staged_fast.kernels.attention import flash_attention, flash_attention_reference  # noqa: E402
from staged_fast.kernels import attention, layernorm  # noqa: E402
from staged_fast.kernels.layernorm import layer_norm, layer_norm_reference  # noqa: E402
from staged_fast.kernels.rmsnorm import rms_norm, rms_norm_reference  # noqa: E402
from staged_fast.kernels.fused_swiglu import swiglu, swiglu_reference  # noqa: E402
from staged_fast.kernels.rope import rope_qk, rope_qk_reference  # noqa: E402
from staged_fast.kernels.fused_linear_ce import (  # noqa: E402
    fp32_output_mode,
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)

CPU = DEVICE.type == "cpu"
# On CPU the interpreter computes bf16 dots wrongly and is slow: fp32, toy shapes.
DTYPE = torch.float32 if CPU else {"bf16": torch.bfloat16, "fp16": torch.float16}[ARGS.dtype]
WARMUP, REPS = (1, 2) if CPU else (5, 10 if ARGS.quick else 30)
ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerLayerNorm
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        print(f"note: Liger-Kernel not importable ({type(e).__name__}: {e}); its rows are skipped.")
        return None, None
    if CPU:
        print("note: Liger-Kernel needs CUDA; its rows are skipped on CPU.")
        return None, None
    return LigerLayerNorm, LigerFusedLinearCrossEntropyLoss


LIGER_LN, LIGER_FLCE = _liger()


# ---- peaks measured in this run, and the card's specification ----

# HBM bandwidth from the vendors' datasheets, bytes/s; matched in order against the device name.
SPEC_BANDWIDTH = (("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("GH200", 4.0e12),
                  ("H200", 4.8e12), ("A100", 2.0e12))


def spec_bandwidth() -> float | None:
    if CPU:
        return None
    name = torch.cuda.get_device_name(DEVICE)
    return next((bw for key, bw in SPEC_BANDWIDTH if key in name), None)



def measure_peaks() -> dict:
    """Memory bandwidth of a large device copy (read + write bytes) and bf16 matmul throughput."""
    n_bytes = (64 << 20) if CPU else ((256 << 20) if ARGS.quick else (1 << 30))
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=DEVICE, warmup=WARMUP, reps=REPS)
    bandwidth = 2 * n_bytes / (t.median_ms * 1e-3)
    n = 512 if CPU else (4096 if ARGS.quick else 8192)
    mm_dtype = torch.float32 if CPU else torch.bfloat16
    a = torch.randn(n, n, device=DEVICE, dtype=mm_dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=mm_dtype)
    t = time_fn(lambda: a @ b, device=DEVICE, warmup=WARMUP, reps=REPS)
    flops = 2 * n**3 / (t.median_ms * 1e-3)
    del src, dst, a, b
    return {"bandwidth_Bps": bandwidth, "matmul_flops": flops, "matmul_dtype": str(mm_dtype)}


# ---- timing ----


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def graph_ms_l2_flushed(call, device=None) -> float:
    """Median ms of `call` replayed from a CUDA graph (device time, no host launch work), with L2 flushed
    before each call as do_bench does and do_bench_cudagraph does not (a norm call moves ~100 MB beside a
    50 MB L2: what stayed there from the previous call would flatter its GB/s): the graph of flush + call,
    less the graph of the flush alone (a write of twice the L2)."""
    import triton.testing

    device = device or DEVICE
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
    flush = torch.empty(2 * l2, dtype=torch.int8, device=device)
    both = triton.testing.do_bench_cudagraph(lambda: (flush.zero_(), call()), rep=50, return_mode="median")
    alone = triton.testing.do_bench_cudagraph(flush.zero_, rep=50, return_mode="median")
    if both - alone < 0.1 * alone:  # a call this short is lost in the flush's own noise
        print(f"note: graph timing: the call ({both - alone:.4f} ms) is under a tenth of the L2 flush ({alone:.4f} "
              f"ms); its figure is noise-bound")
    return max(both - alone, 1e-6)


def time_modes(fn, inputs, grads_out) -> dict:
    """Median ms of fwd (grad enabled, as in training), bwd alone (retain_graph) and fwd+bwd."""
    outs = _as_tuple(fn())
    fwd = time_kernel(fn, device=DEVICE, warmup=WARMUP, reps=REPS)
    bwd = time_kernel(lambda: torch.autograd.grad(outs, inputs, grads_out, retain_graph=True),
                      device=DEVICE, warmup=WARMUP, reps=REPS)
    del outs
    both = time_kernel(lambda: torch.autograd.grad(_as_tuple(fn()), inputs, grads_out),
                       device=DEVICE, warmup=WARMUP, reps=REPS)
    times = {"fwd": fwd.median_ms, "bwd": bwd.median_ms, "fwd+bwd": both.median_ms}
    if not CPU:  # the same fwd+bwd replayed from a CUDA graph: GPU time without the host's launch overhead
        try:
            times["fwd+bwd graph"] = graph_ms_l2_flushed(lambda: torch.autograd.grad(_as_tuple(fn()), inputs, grads_out))
        except Exception as e:  # noqa: BLE001 - a capture failure costs a row, not the run
            print(f"note: CUDA-graph timing failed ({type(e).__name__}: {str(e)[:120]})")
    return times


def validate(name, fn, torch_fn, ref_fn, inputs, grads_out) -> None:
    """Our outputs and gradients within 2x torch's error (same dtype) of an fp32 reference, + atol."""
    outs = _as_tuple(fn())
    gr = torch.autograd.grad(outs, inputs, grads_out)
    touts = _as_tuple(torch_fn())
    tgr = torch.autograd.grad(touts, inputs, grads_out)
    inputs32 = [x.detach().float().requires_grad_() for x in inputs]
    routs = _as_tuple(ref_fn(*inputs32))
    rgr = torch.autograd.grad(routs, inputs32, [g.float() for g in grads_out])
    for i, (o, t, r) in enumerate(zip(outs + gr, touts + tgr, routs + rgr)):
        atol = ATOL[DTYPE] * r.abs().max().item()  # relative to the tensor's scale (CE grads are ~1/N)
        assert_within_torch_error(o, t, r, name=f"{name} tensor {i}", atol=atol)


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def add_rows(rows, kernel, shape, impl, times, work, unit, peak, baseline=None, extra=None):
    """One row per mode; `work(mode)` is bytes (GB/s) or FLOPs (TFLOP/s) of that mode;
    baseline: (name, its times) for the speedup column. GB/s rows also get frac_spec (the card's
    datasheet bandwidth) beside frac_peak (the copy bandwidth measured in this run)."""
    scale = 1e9 if unit == "GB/s" else 1e12
    spec = spec_bandwidth() if unit == "GB/s" else None
    for mode, ms in times.items():
        rate = work(mode.removesuffix(" graph")) / (ms * 1e-3)
        row = {"kernel": kernel, "shape": shape, "impl": impl, "mode": mode, "ms": ms,
               unit: rate / scale, "frac_peak": rate / peak, "frac_spec": rate / spec if spec else None}
        if baseline is not None and mode in baseline[1]:
            row["vs"], row["speedup"] = baseline[0], baseline[1][mode] / ms
        row.update(extra or {})
        rows.append(row)
        print("row:", " | ".join(f"{k}={_short(v)}" for k, v in row.items()), flush=True)  # survives a timeout
    _save(rows, complete=False)


_PEAKS = {}  # the run's measured peaks, for the JSON written after each row


def _save(rows, complete: bool) -> None:
    """--json: the rows so far (atomically; a run cut off by a time limit keeps them), complete or not."""
    if ARGS.json:
        write_json(ARGS.json, {"device": str(DEVICE), "dtype": str(DTYPE), "peaks": _PEAKS, "complete": complete,
                               "rows": rows})


# ---- LayerNorm ----


def norm_bwd_config(hidden: int) -> dict:
    """The backward config the last norm call ran (autotuned on a GPU): a column of the triton rows."""
    if CPU:
        return {}
    c = layernorm._launch_norm_bwd.last if layernorm.AUTOTUNE else layernorm._default_bwd_config(hidden)
    if c is None:
        return {}
    return {"bwd_config": f"rows{c.kwargs['BLOCK_M']}/warps{c.num_warps}/per_sm{c.kwargs['PROGRAMS_PER_SM']}"}


def bench_layer_norm(rows, peaks):
    shapes = [(2, 32, 384), (2, 32, 768)] if CPU else (
        [(16, 1024, 768), (16, 1024, 1536)] if ARGS.quick
        else [(16, 1024, 768), (16, 1024, 1024), (16, 1024, 1536), (8, 4096, 1536)]
    )
    eps = 1e-5
    for B, T, C in shapes:
        shape = f"{B}x{T}x{C}"
        x = torch.randn(B, T, C, device=DEVICE, dtype=DTYPE).requires_grad_()
        w = (1 + 0.1 * torch.randn(C, device=DEVICE)).to(DTYPE).requires_grad_()
        b = (0.1 * torch.randn(C, device=DEVICE)).to(DTYPE).requires_grad_()
        dy = torch.randn_like(x)
        e = x.element_size()
        # Ideal traffic: fwd reads x, writes y; bwd reads x, dy, writes dx (weights and stats ~ 0).
        traffic = {"fwd": 2 * x.numel() * e, "bwd": 3 * x.numel() * e, "fwd+bwd": 5 * x.numel() * e}
        impls = {  # name: (fn, the tensors it differentiates)
            "triton": (lambda: layer_norm(x, w, b, eps), [x, w, b]),
            "torch": (lambda: F.layer_norm(x, (C,), w, b, eps), [x, w, b]),
        }
        if LIGER_LN is not None:
            liger = LIGER_LN(C, eps=eps).to(DEVICE, DTYPE)
            with torch.no_grad():
                liger.weight.copy_(w)
                liger.bias.copy_(b)
            impls["liger"] = (lambda: liger(x), [x, liger.weight, liger.bias])
        ref = lambda x_, w_, b_: layer_norm_reference(x_, w_, b_, eps)  # noqa: E731
        results = {}
        for impl, (fn, params) in impls.items():
            if impl != "torch":  # torch is the baseline the others are held to
                torch_fn = lambda p=params: F.layer_norm(x, (C,), p[1], p[2], eps)  # noqa: E731
                validate(f"layer_norm {impl} {shape}", fn, torch_fn, ref, params, [dy])
            results[impl] = time_modes(fn, params, [dy])
            if impl == "triton":
                config = norm_bwd_config(C)
        for impl, times in results.items():
            add_rows(rows, "layer_norm", shape, impl, times, traffic.get, "GB/s", peaks["bandwidth_Bps"],
                     baseline=None if impl == "torch" else ("torch", results["torch"]),
                     extra=config if impl == "triton" else None)

        # Fused residual add: s = x + r, y = LN(s) in one pass vs torch's two ops. Bytes: fwd reads x, r,
        # writes s, y; bwd reads dy, ds, s and writes dsum (the gradient of both x and r): 4 tensors.
        r = torch.randn_like(x).requires_grad_()
        ds = torch.randn_like(x)
        traffic_res = {"fwd": 4 * x.numel() * e, "bwd": 4 * x.numel() * e, "fwd+bwd": 8 * x.numel() * e}
        fused = lambda: layer_norm(x, w, b, eps, residual=r)  # noqa: E731
        unfused = lambda: layer_norm_reference(x, w, b, eps, residual=r)  # noqa: E731
        ref_res = lambda x_, w_, b_, r_: layer_norm_reference(x_, w_, b_, eps, residual=r_)  # noqa: E731
        validate(f"layer_norm_residual {shape}", fused, unfused, ref_res, [x, w, b, r], [dy, ds])
        base = time_modes(unfused, [x, w, b, r], [dy, ds])
        add_rows(rows, "layer_norm+residual", shape, "triton", time_modes(fused, [x, w, b, r], [dy, ds]),
                 traffic_res.get, "GB/s", peaks["bandwidth_Bps"], baseline=("torch", base), extra=norm_bwd_config(C))
        add_rows(rows, "layer_norm+residual", shape, "torch", base, traffic_res.get, "GB/s", peaks["bandwidth_Bps"])
        if not CPU:
            bench_layer_norm_as_trained(rows, peaks, B, T, C, eps)


def bench_layer_norm_as_trained(rows, peaks, B, T, C, eps):
    """What --bf16 training feeds the norms: fp32 parameters, the fp32 residual stream, a bf16 branch
    output (attention's c_proj under autocast), and y consumed by a bf16 Linear. torch's path: the add
    in fp32, F.layer_norm in fp32 (autocast's rule), the cast to bf16 that the next Linear does; ours
    writes y in bf16 directly. Bytes by the tensors' own sizes."""
    shape = f"{B}x{T}x{C} train"
    f32, lp = torch.float32, DTYPE
    w = (1 + 0.1 * torch.randn(C, device=DEVICE)).requires_grad_()
    b = (0.1 * torch.randn(C, device=DEVICE)).requires_grad_()
    resid = torch.randn(B, T, C, device=DEVICE, dtype=f32).requires_grad_()
    branch = torch.randn(B, T, C, device=DEVICE, dtype=lp).requires_grad_()
    dy = torch.randn(B, T, C, device=DEVICE, dtype=lp)
    ds = torch.randn(B, T, C, device=DEVICE, dtype=f32)
    n = resid.numel()

    def ours_ln():
        with torch.autocast("cuda", dtype=lp):
            return layer_norm(resid, w, b, eps)

    def torch_ln():
        with torch.autocast("cuda", dtype=lp):
            return F.layer_norm(resid, (C,), w, b, eps).to(lp)

    def ours_res():
        with torch.autocast("cuda", dtype=lp):
            return layer_norm(branch, w, b, eps, residual=resid)

    def torch_res():
        with torch.autocast("cuda", dtype=lp):
            s = branch + resid
            return F.layer_norm(s, (C,), w, b, eps).to(lp), s

    # ln_1: reads fp32 x, writes 16-bit y; bwd reads x (fp32), dy (16-bit), writes dx (fp32).
    traffic = {"fwd": n * (4 + 2), "bwd": n * (4 + 2 + 4), "fwd+bwd": n * (4 + 2 + 4 + 2 + 4)}
    base = time_modes(torch_ln, [resid, w, b], [dy])
    add_rows(rows, "layer_norm", shape, "triton", time_modes(ours_ln, [resid, w, b], [dy]), traffic.get, "GB/s",
             peaks["bandwidth_Bps"], baseline=("torch", base), extra=norm_bwd_config(C))
    add_rows(rows, "layer_norm", shape, "torch", base, traffic.get, "GB/s", peaks["bandwidth_Bps"])
    # ln_2 with the residual: fwd reads x (16-bit), r (fp32), writes s (fp32), y (16-bit); bwd reads dy
    # (16-bit), ds, s (fp32), writes dsum (fp32) and the branch's gradient, dsum in 16 bits (ours in the
    # same pass; torch by a cast, whose extra read of dsum is not counted).
    traffic = {"fwd": n * (2 + 4 + 4 + 2), "bwd": n * (2 + 4 + 4 + 4 + 2), "fwd+bwd": n * (12 + 16)}
    params = [branch, resid, w, b]
    base = time_modes(torch_res, params, [dy, ds])
    add_rows(rows, "layer_norm+residual", shape, "triton", time_modes(ours_res, params, [dy, ds]), traffic.get,
             "GB/s", peaks["bandwidth_Bps"], baseline=("torch", base), extra=norm_bwd_config(C))
    add_rows(rows, "layer_norm+residual", shape, "torch", base, traffic.get, "GB/s", peaks["bandwidth_Bps"])


# ---- attention ----


def _sdpa_flash(q, k, v, dropout_p=0.0):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


def _sdpa_gqa(q, k, v, flash_only=True):
    """SDPA reading n_kv-head k, v in place (enable_gqa); flash_only=False lets SDPA pick its backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not flash_only:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def attention_configs() -> dict:
    """The configs the last flash_attention fwd and bwd ran (autotuned on a GPU): BLOCK_M x BLOCK_N / warps /
    stages, to hold against their registers and spills (benchmarks/kernel_resources.py --kernel attention)."""
    if CPU:
        return {}
    out = {}
    launches = [("fwd_config", attention._launch_fwd), ("bwd_config", attention._launch_bwd)]
    if attention.dq_mode() == "split":
        launches.append(("dq_config", attention._launch_dq))
    for name, launch in launches:
        c = launch.last
        if c is not None:
            out[name] = f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}/w{c.num_warps}/s{c.num_stages}"
    return out


def attention_flops(B, H, T, D) -> dict:
    """Causal attention FLOPs by mode (per query head under GQA): the forward's QK^T and PV over the causal
    half, the backward 2.5x that (5 GEMMs to the forward's 2), as FlashAttention counts them."""
    fwd = 4 * B * H * T * T * D / 2
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}


def bench_attention(rows, peaks):
    if CPU:
        shapes = [(1, 2, 64, 64), (1, 2, 64, 96)]
    elif ARGS.quick:
        shapes = [(8, 12, 1024, 64), (8, 8, 1024, 96), (8, 12, 1024, 128)]
    else:  # GPT-2 head counts: 768 = 12 x 64 = 8 x 96; 1536 = 12 x 128
        shapes = [(B, H, T, D) for D, H in ((64, 12), (96, 8), (128, 12)) for B, T in ((16, 1024), (8, 2048), (8, 4096))]
    for B, H, T, D in shapes:
        shape = f"{B}x{H}x{T}x{D}"
        q, k, v = (torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE).requires_grad_() for _ in range(3))
        do = torch.randn_like(q)
        flops = attention_flops(B, H, T, D)

        # Autotune on the timed shape first: the tuner keys on (T, head_dim, dropout), not on batch x heads,
        # so the small validation call below must not be the first to pick the configuration.
        for p in (0.0, 0.1):
            flash_attention(q, k, v, dropout_p=p).backward(do)
        q.grad = k.grad = v.grad = None
        # Validate on one batch element and two heads: same kernel and T, a T x T reference that fits.
        qs, ks, vs = (t[:1, :2].detach().contiguous().requires_grad_() for t in (q, k, v))
        impls = {"triton": lambda: flash_attention(q, k, v)}
        checks = {"triton": lambda: flash_attention(qs, ks, vs)}
        try:
            _sdpa_flash(qs, ks, vs).sum().backward()
            impls["sdpa_flash"] = lambda: _sdpa_flash(q, k, v)
            checks["sdpa_flash"] = lambda: _sdpa_flash(qs, ks, vs)
        except RuntimeError as e:
            print(f"note: SDPA flash backend unavailable at {shape} {DTYPE}: {str(e).splitlines()[0][:160]}")
        scores_bytes = B * H * T * T * 4 * 3  # eager keeps scores, probabilities and their grads
        if scores_bytes < (4 << 30):
            impls["torch_eager"] = lambda: flash_attention_reference(q, k, v)
            checks["torch_eager"] = lambda: flash_attention_reference(qs, ks, vs)
        else:
            print(f"note: torch eager attention skipped at {shape} (T x T scores ~{scores_bytes / 2**30:.0f} GiB).")
        torch_check = lambda: flash_attention_reference(qs, ks, vs)  # noqa: E731
        results = {}
        for impl, fn in impls.items():
            validate(f"attention {impl} {shape}", checks[impl], torch_check, flash_attention_reference,
                     [qs, ks, vs], [do[:1, :2].contiguous()])
            results[impl] = time_modes(fn, [q, k, v], [do])
        base_name = "sdpa_flash" if "sdpa_flash" in results else "torch_eager" if "torch_eager" in results else None
        for impl, times in results.items():
            base = (base_name, results[base_name]) if impl == "triton" and base_name else None
            add_rows(rows, "attention", shape, impl, times, flops.get, "TFLOP/s", peaks["matmul_flops"], baseline=base,
                     extra=attention_configs() if impl == "triton" else None)
        if "sdpa_flash" in results:  # what training runs: dropout 0.1 inside both kernels (masks differ)
            p = 0.1
            try:
                drop = {"sdpa_flash": time_modes(lambda: _sdpa_flash(q, k, v, p), [q, k, v], [do])}
            except RuntimeError as e:
                print(f"note: SDPA flash with dropout unavailable at {shape}: {str(e).splitlines()[0][:160]}")
                drop = {}
            if drop:
                drop["triton"] = time_modes(lambda: flash_attention(q, k, v, dropout_p=p), [q, k, v], [do])
            for impl, times in drop.items():
                base = ("sdpa_flash", drop["sdpa_flash"]) if impl == "triton" else None
                add_rows(rows, "attention", f"{shape} drop{p}", impl, times, flops.get, "TFLOP/s",
                         peaks["matmul_flops"], baseline=base, extra=attention_configs() if impl == "triton" else None)
        del q, k, v, do
    bench_attention_gqa(rows, peaks)


def bench_attention_dq(rows, peaks):
    """The backward's dQ, two ways, dropout 0.1 (as trained): atomic (the default: fp32 atomic adds from
    the dK/dV kernel, 5 GEMMs a tile) against split (a dK/dV kernel plus a dQ kernel: 7 GEMMs a tile, no
    atomics, the same bits every run; what torch.use_deterministic_algorithms(True) runs). Baseline: atomic."""
    if CPU:
        shapes = [(1, 2, 64, 64)]
    elif ARGS.quick:
        shapes = [(8, 12, 1024, 64)]
    else:
        shapes = [(8, 12, 1024, 64), (8, 8, 1024, 96), (8, 12, 1024, 128), (2, 12, 4096, 64)]
    p = 0.1
    for B, H, T, D in shapes:
        shape = f"{B}x{H}x{T}x{D} drop{p}"
        q, k, v = (torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE).requires_grad_() for _ in range(3))
        do = torch.randn_like(q)
        seed = attention.new_seed(DEVICE)
        flops = attention_flops(B, H, T, D)  # the split's 2 extra GEMMs are not counted: equal work, rates compare
        qs, ks, vs = (t[:1, :2].detach().contiguous().requires_grad_() for t in (q, k, v))
        results, configs, mode_before = {}, {}, attention.DQ_MODE
        try:
            for mode in ("atomic", "split"):
                attention.DQ_MODE = mode
                flash_attention(q, k, v, dropout_p=p, seed=seed).backward(do)  # autotune on the timed shape
                q.grad = k.grad = v.grad = None
                # Checked without dropout (the reference then needs no mask): the same kernels otherwise.
                validate(f"attention {mode} dQ {shape}", lambda: flash_attention(qs, ks, vs),
                         lambda: flash_attention_reference(qs, ks, vs), flash_attention_reference, [qs, ks, vs],
                         [do[:1, :2].contiguous()])
                results[mode] = time_modes(lambda: flash_attention(q, k, v, dropout_p=p, seed=seed), [q, k, v], [do])
                configs[mode] = attention_configs()
        finally:
            attention.DQ_MODE = mode_before
        for mode, times in results.items():
            base = ("triton_atomic_dq", results["atomic"]) if mode == "split" else None
            add_rows(rows, "attention", shape, f"triton_{mode}_dq", times, flops.get, "TFLOP/s", peaks["matmul_flops"],
                     baseline=base, extra=configs[mode])
        del q, k, v, do


def bench_attention_gqa(rows, peaks):
    """Grouped-query attention (llama): k, v with n_kv < n_head heads. Ours reads them in place (dk, dv
    summed over each group inside the backward); baselines: SDPA with enable_gqa=True (its flash backend
    when it takes GQA, else the backend SDPA picks) and our kernel on K/V repeated to n_head heads (the
    pre-GQA path: repeat_interleave forward, a sum over the copies backward)."""
    shapes = [(1, 4, 2, 64, 64)] if CPU else [(4, 12, 4, 1024, 64)]
    for B, H, H_kv, T, D in shapes:
        r = H // H_kv
        shape = f"{B}x{H}/{H_kv}x{T}x{D}"
        q = torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE).requires_grad_()
        k, v = (torch.randn(B, H_kv, T, D, device=DEVICE, dtype=DTYPE).requires_grad_() for _ in range(2))
        do = torch.randn_like(q)
        flops = attention_flops(B, H, T, D)
        flash_attention(q, k, v).backward(do)  # autotune on the timed shape first (see bench_attention)
        q.grad = k.grad = v.grad = None
        # Validate on one batch element and two kv heads (2r query heads): the GQA path, a small T x T reference.
        qs = q[:1, : 2 * r].detach().contiguous().requires_grad_()
        ks, vs = (t[:1, :2].detach().contiguous().requires_grad_() for t in (k, v))
        rep = lambda t: t.repeat_interleave(r, dim=1)  # noqa: E731
        impls = {"triton": lambda: flash_attention(q, k, v),
                 "triton_repeat_kv": lambda: flash_attention(q, rep(k), rep(v))}
        checks = {"triton": lambda: flash_attention(qs, ks, vs),
                  "triton_repeat_kv": lambda: flash_attention(qs, rep(ks), rep(vs))}
        for flash_only, name in ((True, "sdpa_gqa_flash"), (False, "sdpa_gqa")):
            try:
                _sdpa_gqa(qs, ks, vs, flash_only).sum().backward()
            except RuntimeError as e:
                print(f"note: SDPA {name} unavailable at {shape} {DTYPE}: {str(e).splitlines()[0][:160]}")
                continue
            impls[name] = lambda f=flash_only: _sdpa_gqa(q, k, v, f)
            checks[name] = lambda f=flash_only: _sdpa_gqa(qs, ks, vs, f)
            break
        torch_check = lambda: flash_attention_reference(qs, ks, vs)  # noqa: E731
        results = {}
        for impl, fn in impls.items():
            validate(f"attention gqa {impl} {shape}", checks[impl], torch_check, flash_attention_reference,
                     [qs, ks, vs], [do[:1, : 2 * r].contiguous()])
            results[impl] = time_modes(fn, [q, k, v], [do])
        base_name = next((n for n in ("sdpa_gqa_flash", "sdpa_gqa") if n in results), None)
        for impl, times in results.items():
            base = (base_name, results[base_name]) if impl != base_name and base_name else None
            add_rows(rows, "attention", shape, impl, times, flops.get, "TFLOP/s", peaks["matmul_flops"], baseline=base)
        del q, k, v, do


# ---- fused linear + cross-entropy ----


def bench_linear_ce(rows, peaks):
    V = 1000 if CPU else 50257
    shapes = [(64, 64)] if CPU else ([(8 * 1024, 768)] if ARGS.quick else [(8 * 1024, 768), (16 * 1024, 768), (8 * 1024, 1536), (16 * 1024, 1536)])
    for N, d in shapes:
        shape = f"{N}x{d}x{V}"
        h = torch.randn(N, d, device=DEVICE, dtype=DTYPE).requires_grad_()
        w = (torch.randn(V, d, device=DEVICE) / math.sqrt(d)).to(DTYPE).requires_grad_()
        t = torch.randint(0, V, (N,), device=DEVICE)
        g = torch.ones((), device=DEVICE)
        flops = {"fwd": 2 * N * V * d, "bwd": 4 * N * V * d, "fwd+bwd": 6 * N * V * d}  # nominal, per the unfused split
        impls = {
            "triton": lambda: fused_linear_cross_entropy(h, w, t),
            "torch": lambda: linear_cross_entropy_reference(h, w, t),
        }
        if LIGER_FLCE is not None:
            liger = LIGER_FLCE()
            impls["liger"] = lambda: _as_tuple(liger(w, h, t))[0]
        n_val = min(N, 2048)  # validate on the first tokens: the fp32 reference logits stay small
        hs, ts = h[:n_val].detach().requires_grad_(), t[:n_val]
        ws = w.detach().requires_grad_()
        checks = {
            "triton": lambda: fused_linear_cross_entropy(hs, ws, ts),
            "liger": lambda: _as_tuple(liger(ws, hs, ts))[0],
        }
        ref = lambda h_, w_: linear_cross_entropy_reference(h_, w_, ts)  # noqa: E731
        results, peak_mb = {}, {}
        for impl, fn in impls.items():
            if impl != "torch":
                validate(f"linear_ce {impl} {shape}", checks[impl], lambda: linear_cross_entropy_reference(hs, ws, ts),
                         ref, [hs, ws], [g])
            results[impl] = time_modes(fn, [h, w], [g])
            if not CPU:
                peak_mb[impl] = peak_memory_cuda(lambda: torch.autograd.grad(fn(), [h, w], [g]), DEVICE) / 2**20
        for impl, times in results.items():
            extra = {}
            if impl in peak_mb:
                extra = {"peak_MiB": peak_mb[impl], "mem_vs_torch": peak_mb[impl] / peak_mb["torch"]}
            if impl == "triton" and not CPU:  # how the fp32 gradient GEMMs ran (fused_linear_ce.fp32_output_mode)
                extra["fp32_gemm"] = fp32_output_mode(h.device, DTYPE)
            add_rows(rows, "linear_ce", shape, impl, times, flops.get, "TFLOP/s", peaks["matmul_flops"],
                     baseline=None if impl == "torch" else ("torch", results["torch"]), extra=extra)
        del h, w


ROUNDS_CPU = 3 if ARGS.quick else 7  # interleaved rounds of the CPU group (each round: 2 timed calls per mode)


def bench_linear_ce_cpu(rows, peaks):
    """The CPU training path of the LM-head loss vs F.linear + F.cross_entropy, fp32, GPT-2's vocabulary."""
    if not CPU:
        print("note: linear_ce_cpu is the CPU training path; skipped on", DEVICE)
        return
    from staged_fast.kernels.cpu_linear_ce import linear_cross_entropy_cpu

    V = 50257
    shapes = [(128, 256)] if ARGS.quick else [(128, 256), (512, 256), (512, 768)]
    for N, d in shapes:
        shape = f"{N}x{d}x{V}"
        h = torch.randn(N, d).requires_grad_()
        w = (torch.randn(V, d) / math.sqrt(d)).requires_grad_()
        t = torch.randint(0, V, (N,))
        g = torch.ones(())
        flops = {"fwd": 2 * N * V * d, "bwd": 4 * N * V * d, "fwd+bwd": 6 * N * V * d}
        ours = lambda: linear_cross_entropy_cpu(h, w, t)  # noqa: E731
        plain = lambda: linear_cross_entropy_reference(h, w, t)  # noqa: E731
        validate(f"linear_ce_cpu {shape}", ours, plain, lambda h_, w_: linear_cross_entropy_reference(h_, w_, t),
                 [h, w], [g])
        # interleaved rounds: a shared CPU's load drifts, and both rows should see the same drift
        times = {"cpu_transposed": [], "torch": []}
        for _ in range(ROUNDS_CPU):
            times["cpu_transposed"].append(time_modes(ours, [h, w], [g]))
            times["torch"].append(time_modes(plain, [h, w], [g]))
        med = {impl: {mode: statistics.median(r[mode] for r in runs) for mode in runs[0]} for impl, runs in times.items()}
        for impl in ("torch", "cpu_transposed"):
            add_rows(rows, "linear_ce_cpu", shape, impl, med[impl], flops.get, "TFLOP/s", peaks["matmul_flops"],
                     baseline=None if impl == "torch" else ("torch", med["torch"]))
        del h, w


# ---- llama: RMSNorm (+ residual), SwiGLU ----


def bench_llama(rows, peaks):
    """Triton RMSNorm (+ fused residual), fused SwiGLU and RoPE on q and k (one launch) vs their plain-PyTorch twins
    (GB/s of ideal traffic)."""
    shapes = [(2, 32, 384)] if CPU else ([(16, 1024, 768)] if ARGS.quick else [(16, 1024, 768), (16, 1024, 1536)])
    eps = 1e-6
    for B, T, C in shapes:
        shape = f"{B}x{T}x{C}"
        x = torch.randn(B, T, C, device=DEVICE, dtype=DTYPE).requires_grad_()
        r = torch.randn_like(x).requires_grad_()
        w = (1 + 0.1 * torch.randn(C, device=DEVICE)).to(DTYPE).requires_grad_()
        dy, ds = torch.randn_like(x), torch.randn_like(x)
        n, e = x.numel(), x.element_size()
        traffic = {"fwd": 2 * n * e, "bwd": 3 * n * e, "fwd+bwd": 5 * n * e}
        ours, base = (lambda: rms_norm(x, w, eps)), (lambda: rms_norm_reference(x, w, eps))
        validate(f"rms_norm {shape}", ours, base, lambda x_, w_: rms_norm_reference(x_, w_, eps), [x, w], [dy])
        tb = time_modes(base, [x, w], [dy])
        add_rows(rows, "rms_norm", shape, "triton", time_modes(ours, [x, w], [dy]), traffic.get, "GB/s",
                 peaks["bandwidth_Bps"], baseline=("torch", tb), extra=norm_bwd_config(C))
        add_rows(rows, "rms_norm", shape, "torch", tb, traffic.get, "GB/s", peaks["bandwidth_Bps"])
        traffic_res = {"fwd": 4 * n * e, "bwd": 4 * n * e, "fwd+bwd": 8 * n * e}
        ours = lambda: rms_norm(x, w, eps, residual=r)  # noqa: E731
        base = lambda: rms_norm_reference(x, w, eps, residual=r)  # noqa: E731
        validate(f"rms_norm_residual {shape}", ours, base,
                 lambda x_, w_, r_: rms_norm_reference(x_, w_, eps, residual=r_), [x, w, r], [dy, ds])
        tb = time_modes(base, [x, w, r], [dy, ds])
        add_rows(rows, "rms_norm+residual", shape, "triton", time_modes(ours, [x, w, r], [dy, ds]), traffic_res.get,
                 "GB/s", peaks["bandwidth_Bps"], baseline=("torch", tb), extra=norm_bwd_config(C))
        add_rows(rows, "rms_norm+residual", shape, "torch", tb, traffic_res.get, "GB/s", peaks["bandwidth_Bps"])
        F_ = 8 * C // 3 // 64 * 64  # SwiGLU hidden
        g = torch.randn(B, T, F_, device=DEVICE, dtype=DTYPE).requires_grad_()
        u = torch.randn_like(g).requires_grad_()
        dout = torch.randn_like(g)
        m = g.numel() * e
        traffic_sw = {"fwd": 3 * m, "bwd": 5 * m, "fwd+bwd": 8 * m}  # fwd reads g, u writes out; bwd reads 3 writes 2
        validate(f"swiglu {shape}x{F_}", lambda: swiglu(g, u), lambda: swiglu_reference(g, u), swiglu_reference,
                 [g, u], [dout])
        tb = time_modes(lambda: swiglu_reference(g, u), [g, u], [dout])
        add_rows(rows, "swiglu", f"{B}x{T}x{F_}", "triton", time_modes(lambda: swiglu(g, u), [g, u], [dout]),
                 traffic_sw.get, "GB/s", peaks["bandwidth_Bps"], baseline=("torch", tb))
        add_rows(rows, "swiglu", f"{B}x{T}x{F_}", "torch", tb, traffic_sw.get, "GB/s", peaks["bandwidth_Bps"])
        # RoPE on q (n_head heads) and k (n_kv = n_head / 3 heads, GQA) in one launch, head_dim 64, read as the
        # strided views of one projection output the model makes
        H, KV, D = C // 64, max(1, C // 192), 64
        proj = torch.randn(B, T, (H + KV) * D, device=DEVICE, dtype=DTYPE).requires_grad_()
        q, k = proj[..., :H * D].view(B, T, H, D), proj[..., H * D:].view(B, T, KV, D)
        angle = torch.arange(T, device=DEVICE)[:, None] * 10000.0 ** (-torch.arange(D // 2, device=DEVICE) / (D // 2))
        cos, sin = angle.cos().to(DTYPE), angle.sin().to(DTYPE)
        dq, dk = torch.randn(B, T, H, D, device=DEVICE, dtype=DTYPE), torch.randn(B, T, KV, D, device=DEVICE, dtype=DTYPE)
        qk = B * T * (H + KV) * D * e
        traffic_rope = {"fwd": 2 * qk, "bwd": 2 * qk, "fwd+bwd": 4 * qk}
        ours, base = (lambda: rope_qk(q, k, cos, sin)), (lambda: rope_qk_reference(q, k, cos, sin))
        validate(f"rope_qk {shape}", ours, base, lambda p_: rope_qk_reference(
            p_[..., :H * D].view(B, T, H, D), p_[..., H * D:].view(B, T, KV, D), cos, sin), [proj], [dq, dk])
        tb = time_modes(base, [proj], [dq, dk])
        label = f"{B}x{T}x{H}+{KV}x{D}"
        add_rows(rows, "rope_qk", label, "triton", time_modes(ours, [proj], [dq, dk]), traffic_rope.get, "GB/s",
                 peaks["bandwidth_Bps"], baseline=("torch", tb))
        add_rows(rows, "rope_qk", label, "torch", tb, traffic_rope.get, "GB/s", peaks["bandwidth_Bps"])


def main():
    prov = provenance()
    print(f"bench_kernels on {DEVICE} ({prov.get('gpu', prov['cpu'])}), dtype {DTYPE}, torch {prov['torch']}, "
          f"triton {prov.get('triton')}, {prov['date']}")
    if CPU:
        print("note: CPU run under TRITON_INTERPRET=1 at toy shapes: proves the script runs; times are meaningless.")
    peaks = measure_peaks()
    _PEAKS.update(peaks)
    print(f"measured peaks: copy bandwidth {peaks['bandwidth_Bps'] / 1e9:.0f} GB/s, "
          f"matmul ({peaks['matmul_dtype']}) {peaks['matmul_flops'] / 1e12:.1f} TFLOP/s")
    rows = []
    for name, fn in (("layer_norm", bench_layer_norm), ("attention", bench_attention),
                     ("attention_dq", bench_attention_dq), ("linear_ce", bench_linear_ce),
                     ("llama", bench_llama), ("linear_ce_cpu", bench_linear_ce_cpu)):
        if ARGS.only == "all" or name in ARGS.only.split(","):
            fn(rows, peaks)
    columns = ["kernel", "shape", "impl", "mode", "ms", "GB/s", "TFLOP/s", "frac_peak", "frac_spec", "vs", "speedup",
               "peak_MiB", "mem_vs_torch"]
    print_table(rows, columns)
    print("speedup = ms of the baseline named in 'vs' / this ms (> 1 is faster); frac_peak = rate / measured peak "
          "(copy bandwidth for GB/s, bf16 matmul for TFLOP/s), both measured in this run; frac_spec = GB/s / the card's "
          "datasheet bandwidth. Kernel times: triton.testing.do_bench medians, L2 flushed before each call.")
    _save(rows, complete=True)


if __name__ == "__main__":
    main()
