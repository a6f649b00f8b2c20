"""Claim: fused growth kernels grow a model + AdamW state >= 3x faster than the PyTorch reference
(torch.cat / zeros, the seed's way) on CPU, within the memory bound (grown state + largest old tensor
+ 5%); on GPU at >= 80% of the measured copy bandwidth.

    python benchmarks/bench_growth.py                 # GPT2_large_div2_width (width) and _div2_depth (depth)
    python benchmarks/bench_growth.py --quick         # GPT2_base_div2_width / _div2_depth
    python benchmarks/bench_growth.py --device cuda

Every (preset, backend) runs in a fresh subprocess (CPU) so its peak resident memory is its own: peak is
ru_maxrss above the RSS before the old model is built (glibc mmaps allocations >= 64 KiB, so freed
tensors leave the RSS at once). On CUDA, peak is torch.cuda.max_memory_allocated above what was allocated
before the old model was built (its weights and AdamW state count, as on CPU and in the bound); each rep
starts from an empty allocator cache.
Time: the median of --reps growths of a freshly built model with random exp_avg/exp_avg_sq. GB/s
counts the bytes the op must move: every old tensor read once, every grown tensor written once.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from staged_fast.cli_help import HelpFormatter  # noqa: E402

import torch  # noqa: E402

from benchmarks.harness import print_table, provenance, write_json  # noqa: E402


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build(preset: str, device: str):
    from staged_fast import GPT
    from staged_fast.config import preset_config

    cfg = preset_config(preset, dropout=0.0, attn_dropout=0.0)
    with torch.device("meta"):
        model = GPT(cfg)
    g = torch.Generator(device=device).manual_seed(0)
    for m in model.modules():
        for k, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                m._parameters[k] = torch.nn.Parameter(torch.empty(p.shape, device=device).normal_(0, 0.02, generator=g))
    model.lm_head.weight = model.transformer.wte.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        opt.state[p] = {"step": torch.tensor(100.0), "exp_avg": torch.empty_like(p).normal_(0, 1e-3, generator=g),
                        "exp_avg_sq": torch.empty_like(p).uniform_(0, 1e-6, generator=g)}
    return model, opt


def worker(preset: str, op: str, backend: str, device: str, reps: int) -> dict:
    from staged_fast.growth import grow_model

    dev = torch.device(device)
    tiny, tiny_opt = _build("tiny", device)  # warm-up: libraries, extension, threads, CUDA context
    grow_model(tiny, tiny_opt, op, backend=backend)
    del tiny, tiny_opt
    times, peak, old_bytes, grown_bytes, largest = [], 0, 0, 0, 0
    for _ in range(reps):
        if dev.type == "cuda":  # each rep and backend from an empty cache: the backend run second (and a second
            torch.cuda.empty_cache()  # rep) would otherwise reuse the first one's cached blocks
        model, opt = _build(preset, device)
        old_bytes = sum(p.numel() * p.element_size() * 3 for p in model.parameters())
        largest = max(p.numel() * p.element_size() for p in model.parameters())
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() - old_bytes  # as on CPU: the old state counts as growth's
        else:
            base = _rss() - old_bytes  # the old state is resident already; count it as growth's
        t0 = time.perf_counter()
        new, new_opt = grow_model(model, opt, op, backend=backend)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del model, opt
        if dev.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        else:
            import resource

            peak = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
        grown_bytes = sum(p.numel() * p.element_size() * 3 for p in new.parameters())
        del new, new_opt
    # width: every old tensor read once, every grown one written once; depth: the original layers move
    # without a copy, the inserted ones (grown - old bytes) are read once from their source and written once.
    moved = (old_bytes + grown_bytes) if op == "width" else 2 * (grown_bytes - old_bytes)
    t = statistics.median(times)
    return dict(preset=preset, op=op, backend=backend, device=device, time_s=t, times=times, peak_bytes=peak,
                grown_bytes=grown_bytes, largest_old_bytes=largest, gbps=moved / t / 1e9)


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """GB/s of dst.copy_(src) (read + write counted) on `device`."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = max(best, 2 * nbytes / (time.perf_counter() - t0) / 1e9)
    return best


KERNEL_CASES = (  # GPT2_large_div2_width -> GPT2_large (d 768 -> 1536): its largest tensors, as grown
    ("transformer.h.0.attn.c_attn.weight", (3 * 768, 768), 768),
    ("transformer.h.0.mlp.c_fc.weight", (4 * 768, 768), 768),
    ("transformer.h.0.mlp.c_proj.weight", (768, 4 * 768), 768),
    ("transformer.wte.weight", (50257, 768), 768),
)


def kernel_rows(device: str, copy_gbps: float | None) -> list[dict]:
    """The fused kernel alone on one parameter + exp_avg + exp_avg_sq (fp32), outputs preallocated: what
    the >= 80%-of-copy goal is about (grow_model adds module building and allocation around it). Bytes:
    the three sources read once, the three grown tensors written once. Fused vs a torch reference in
    the same run (torch.cat / block_diag per tensor, what the seed does)."""
    from benchmarks.harness import time_kernel
    from staged_fast import ops
    from staged_fast.growth import index_maps as im

    rows = []
    for name, shape, d in KERNEL_CASES:
        rule = im.width_rule(name, shape, d)
        src = [torch.randn(shape, device=device) for _ in range(2)] + [torch.rand(shape, device=device)]
        dst = [torch.empty(rule.dst_shape, device=device) for _ in src]
        scales = [1.0, rule.grad_scale, rule.exp_avg_sq_scale]
        fused = lambda: ops.grow_tiles_(src, dst, scales, rule.tiling, backend="fused")  # noqa: E731
        reference = lambda: ops.grow_tiles_(src, dst, scales, rule.tiling, backend="reference")  # noqa: E731
        moved = 3 * 4 * (src[0].numel() + dst[0].numel())
        t_fused = time_kernel(fused, device=device).median_ms
        t_ref = time_kernel(reference, device=device).median_ms
        row = dict(case=f"{name.split('.')[-2]} {'x'.join(map(str, shape))}", fused_ms=t_fused, reference_ms=t_ref,
                   speedup=t_ref / t_fused, gbps=moved / (t_fused * 1e-3) / 1e9)
        if copy_gbps:
            row["pct_of_copy"] = 100 * row["gbps"] / copy_gbps
        rows.append(row)
    return rows


def validate(device: str) -> None:
    """The fused and the reference path grow a small model on `device` to identical tensors (else no timing)."""
    from staged_fast.growth import grow_model

    for op in ("width", "alternate_id"):
        (a, ao), (b, bo) = _build("tiny", device), _build("tiny", device)
        a, ao = grow_model(a, ao, op, backend="fused")
        b, bo = grow_model(b, bo, op, backend="reference")
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q) and torch.equal(ao.state[p]["exp_avg_sq"], bo.state[q]["exp_avg_sq"]), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--quick", action="store_true", help="GPT2_base_div2_* instead of GPT2_large_div2_*")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--_worker", nargs=3, metavar=("PRESET", "OP", "BACKEND"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        print(json.dumps(worker(*args._worker, args.device, args.reps)))
        return
    from staged_fast import ops

    if not ops.extension_available(args.device):
        sys.exit(f"staged_fast._C has no kernels for {args.device}; build it first (docs/growth.md)")
    validate(args.device)
    size = "base" if args.quick else "large"
    cases = [(f"GPT2_{size}_div2_width", "width"), (f"GPT2_{size}_div2_depth", "alternate_id")]
    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    for preset, op in cases:
        result = {}
        for backend in ("fused", "reference"):
            if args.device == "cpu":
                out = subprocess.run([sys.executable, __file__, "--_worker", preset, op, backend, "--reps", str(args.reps)],
                                     capture_output=True, text=True, env=env, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
            else:
                r = worker(preset, op, backend, args.device, args.reps)
            bound = r["grown_bytes"] * 1.05 + r["largest_old_bytes"]
            r.update(peak_MiB=r["peak_bytes"] / 2**20, bound_MiB=bound / 2**20, within_bound=r["peak_bytes"] <= bound)
            result[backend] = r
            rows.append(r)
        result["fused"]["speedup"] = result["reference"]["time_s"] / result["fused"]["time_s"]
    if args.device != "cpu":
        bw = copy_bandwidth(args.device)
        for r in rows:
            r["copy_GBps"], r["pct_of_copy"] = bw, 100 * r["gbps"] / bw
    print(json.dumps(provenance()))
    print_table(rows, ["preset", "op", "backend", "time_s", "speedup", "gbps", "peak_MiB", "bound_MiB", "within_bound"]
                + (["pct_of_copy"] if args.device != "cpu" else []))
    kernels = kernel_rows(args.device, bw if args.device != "cpu" else None)
    print("\nkernel alone (param + exp_avg + exp_avg_sq, fp32, outputs preallocated):")
    print_table(kernels, ["case", "fused_ms", "reference_ms", "speedup", "gbps"]
                + (["pct_of_copy"] if args.device != "cpu" else []))
    if args.json:
        write_json(args.json, {"rows": rows, "kernel_rows": kernels})


if __name__ == "__main__":
    main()
