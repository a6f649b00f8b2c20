"""Where the time goes: torch.profiler tables (device kernels and host time) for one fwd+bwd of each
fused op at GPT-2 shapes and for one GPT2_base training step with the Triton kernels.

Not a benchmark (no ratios are claimed from it): it tells the next optimisation what to look at, e.g.
whether an op is bound by host launch overhead (host time >> device time) or by one slow device kernel.

    python benchmarks/profile_ops.py            # CUDA; prints one table per op, top kernels by device time
    python benchmarks/profile_ops.py --only ce  # one op (ln, attn, ce, step)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from staged_fast.cli_help import HelpFormatter  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def _ops(device, dtype):
    from staged_fast.kernels.attention import flash_attention
    from staged_fast.kernels.fused_linear_ce import fused_linear_cross_entropy
    from staged_fast.kernels.layernorm import layer_norm

    B, T, C, H = 16, 1024, 768, 12
    x = torch.randn(B, T, C, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(B, T, C, device=device, requires_grad=True)  # fp32 residual stream, as under autocast
    w = torch.ones(C, device=device, requires_grad=True)
    b = torch.zeros(C, device=device, requires_grad=True)
    q, k, v = (torch.randn(B, H, T, C // H, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    h = torch.randn(B * T // 2, C, device=device, dtype=dtype, requires_grad=True)
    wte = (torch.randn(50257, C, device=device) * 0.02).to(dtype).requires_grad_()
    tgt = torch.randint(0, 50257, (B * T // 2,), device=device)

    def ln():
        with torch.autocast(device.type, dtype=dtype):
            y, s = layer_norm(x, w, b, 1e-5, residual=r)
        (y.float().sum() + s.sum()).backward()

    def attn():
        flash_attention(q, k, v, dropout_p=0.1).float().sum().backward()

    def ce():
        fused_linear_cross_entropy(h, wte, tgt).backward()

    return {"ln": ln, "attn": attn, "ce": ce}


def _step(device):
    from staged_fast.config import preset_config
    from staged_fast.model import GPT

    model = GPT(preset_config("GPT2_base", dropout=0.1, attn_dropout=0.1), kernels_backend="triton").to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    data = torch.randint(0, 50257, (16, 1025), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--only", default="ln,attn,ce,step", help="comma-separated: ln, attn, ce, step")
    ap.add_argument("--rows", type=int, default=12, help="kernels per table")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_ops needs CUDA (the Triton kernels compiled for a GPU).")
    device = torch.device("cuda")
    wanted = args.only.split(",")
    fns = {k: f for k, f in _ops(device, torch.bfloat16).items() if k in wanted}
    if "step" in wanted:
        fns["step"] = _step(device)
    for name, fn in fns.items():
        for _ in range(3):  # compile, autotune, warm the allocator
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        print(f"\n=== {name}: 3 calls")
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
