"""Host time of an eager fwd+bwd of each Triton op vs the torch op it replaces, at shapes too small to matter.

Eager training launches ~20-60 us kernels; when the host takes longer to issue an op than the device
takes to run it, the GPU waits (an H200 measured our eager layer norm at 3.5x and attention at 4.4x the
host time of the torch ops). This script times what the host spends per fwd+bwd:

  --device cuda: real launches on tiny tensors (the device finishes each kernel long before the host
                 issues the next), wall time per call over many calls, one synchronize at the end;
  --device cpu:  our launchers with every Triton launch replaced by a no-op, so what is left is our
                 Python (checks, allocations, autograd, the autotuner's lookup) — the part this package
                 controls; the torch ops run for real on tiny tensors (their dispatch plus a little math).

    python benchmarks/host_overhead.py               # CPU, launches stubbed
    python benchmarks/host_overhead.py --device cuda
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from staged_fast.cli_help import HelpFormatter  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--calls", type=int, default=300, help="timed calls per round (default 300)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported (default 5)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.rounds < 1:
        ap.error("--calls and --rounds must be >= 1")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # the launchers accept CPU tensors; the launches are stubbed below

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.harness import print_table, write_json  # noqa: E402
from staged_fast.kernels import attention, layernorm  # noqa: E402


class _NoLaunch:
    """Stands in for a Triton kernel (plain or autotuned): `kernel[grid](...)` does nothing."""

    def __init__(self, best_config=None):
        self.best_config = best_config

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None

    def __call__(self, grid, key, *args, **kwargs):  # as a kernels._common.TunedLaunch
        return self.best_config

    @property
    def fn(self):
        return self


def stub_launches() -> None:
    """Replace every Triton kernel the timed ops launch by a no-op (CPU mode)."""
    for name in ("_layer_norm_fwd_kernel", "_sum_partials_kernel"):
        setattr(layernorm, name, _NoLaunch())
    layernorm._norm_bwd_kernel = _NoLaunch(layernorm._default_bwd_config(768))
    layernorm._launch_norm_bwd = _NoLaunch(layernorm._default_bwd_config(768))
    for name in ("_attn_fwd_kernel", "_attn_bwd_prep_kernel", "_attn_bwd_kernel", "_launch_fwd", "_launch_bwd"):
        setattr(attention, name, _NoLaunch())


def cases(device: str) -> dict:
    """name: (ours, torch's), each a fwd+bwd closure over tiny inputs."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def leaf(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

    C = 768
    x, w, b = leaf(2, 8, C), leaf(C), leaf(C)
    branch, resid = leaf(2, 8, C, dtype=torch.bfloat16), leaf(2, 8, C)
    dy, ds = torch.randn(2, 8, C, device=device), torch.randn(2, 8, C, device=device)
    q, k, v = (leaf(1, 2, 16, 64, dtype=torch.bfloat16 if device == "cuda" else torch.float32) for _ in range(3))
    do = torch.randn_like(q)

    def grad(outs, inputs, grads):
        torch.autograd.grad(outs, inputs, grads)

    return {
        "layer_norm (fp32)": (
            lambda: grad(layernorm.layer_norm(x, w, b), (x, w, b), dy),
            lambda: grad(F.layer_norm(x, (C,), w, b), (x, w, b), dy),
        ),
        "layer_norm + residual (bf16 branch, fp32 stream)": (
            lambda: grad(layernorm.layer_norm(branch, w, b, residual=resid), (branch, resid, w, b), (dy, ds)),
            lambda: grad(_torch_residual(branch, resid, w, b), (branch, resid, w, b), (dy, ds)),
        ),
        "attention (causal, T=16, head_dim 64)": (
            lambda: grad(attention.flash_attention(q, k, v), (q, k, v), do),
            lambda: grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), do),
        ),
    }


def _torch_residual(x, r, w, b):
    s = x + r
    return F.layer_norm(s, (s.shape[-1],), w, b), s


def host_us(fn, calls: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv=None) -> None:
    args = ARGS if argv is None and ARGS is not None else parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("host_overhead.py: error: --device cuda needs a GPU; use --device cpu (launches stubbed)", file=sys.stderr)
        sys.exit(2)
    if args.device == "cpu":
        stub_launches()
    rows = []
    for name, (ours, base) in cases(args.device).items():
        for fn in (ours, base, ours, base):  # warm-up: compiles, autotunes, allocator pools
            for _ in range(20):
                fn()
        samples = {"ours": [], "torch": []}
        for _ in range(args.rounds):  # interleaved: both see the same machine state
            samples["ours"].append(host_us(ours, args.calls, args.device))
            samples["torch"].append(host_us(base, args.calls, args.device))
        ours_us, torch_us = (statistics.median(samples[k]) for k in ("ours", "torch"))
        rows.append({"op": name, "ours_us": ours_us, "torch_us": torch_us, "ours/torch": ours_us / torch_us})
        print("row:", rows[-1], flush=True)
    print()
    print_table(rows, ["op", "ours_us", "torch_us", "ours/torch"])
    mode = ("real launches, tiny shapes" if args.device == "cuda"
            else "Triton launches stubbed (our Python only); torch ops run for real on tiny tensors")
    print(f"\nhost microseconds per eager fwd+bwd, median of {args.rounds} interleaved rounds of {args.calls} calls; {mode}")
    if args.json:
        write_json(args.json, {"device": args.device, "rows": rows})


if __name__ == "__main__":
    main()
