"""Claim: --parallel fsdp holds less per rank than ddp, and growth inside the shards less than gathering;
what an update and a growth cost under each.

For each of ddp, fsdp with growth inside the shards and fsdp with gather-grow-reshard, N CPU processes
(torchrun, gloo) build the same model (`--size`, dropout 0), take `--steps` AdamW updates on random tokens
(after one warm-up update) and report per rank: the peak resident memory during the updates (VmHWM, reset
through /proc/self/clear_refs after the model and optimizer are built; the figure includes the process's
libraries, so the delta over the resident size before the updates is reported too), the median update time,
and then the peak and time of one width growth (`--grow_op`): ddp, every rank grows its full copy
(grow_model); fsdp "sharded", each rank builds only its rows (staged_fast.sharded.grow_sharded, what the
trainer runs); fsdp "gather", every rank gathers the full model and state, grows and reshards
(grow_gather_reshard). The growth peak's delta is over the resident size right before growth.

    python benchmarks/bench_distributed.py                      # 2 processes, size small
    python benchmarks/bench_distributed.py --nproc 4 --size GPT2_base_div2_width --steps 3
    python benchmarks/bench_distributed.py --size tiny --steps 1 --batch_size 1 --seqlen 16   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from staged_fast.cli_help import HelpFormatter  # noqa: E402


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def worker(args) -> None:
    import torch

    from staged_fast import distributed as D
    from staged_fast.config import preset_config
    from staged_fast.growth import grow_model
    from staged_fast.model import GPT
    from staged_fast.sharded import grow_gather_reshard, grow_sharded, local_value, shard

    info = D.init("cpu", args.parallel)
    torch.manual_seed(0)
    config = preset_config(args.size, vocab_size=50257, dropout=0.0, attn_dropout=0.0)
    model = GPT(config)

    def make_optimizer(m, lr):
        return torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)

    if args.parallel == "fsdp":
        shard(model)
        train_model = model
    else:
        train_model = D.wrap(model, info)
    opt = make_optimizer(model, 1e-4)
    x = torch.randint(0, 50257, (args.batch_size, args.seqlen))

    def update():
        loss = train_model(x, x)
        loss.backward()
        local_value(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)

    update()  # warm-up: allocates AdamW state and gradients
    D.barrier(info)
    rss0 = _status_kib("VmRSS")
    _reset_peak()
    times = []
    for _ in range(args.steps):
        D.barrier(info)
        t0 = time.perf_counter()
        update()
        times.append(time.perf_counter() - t0)
    peak = _status_kib("VmHWM")

    D.barrier(info)
    rss1 = _status_kib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    if args.parallel == "ddp":
        grown, _ = grow_model(model, opt, args.grow_op)
    elif args.growth == "gather":
        grown, _ = grow_gather_reshard(model, opt, args.grow_op, make_optimizer=make_optimizer)
    else:
        grown, _ = grow_sharded(model, opt, args.grow_op)
    D.barrier(info)
    grow_s = time.perf_counter() - t0
    grow_peak = _status_kib("VmHWM")
    out = dict(rank=info.rank, parallel=args.parallel, growth=args.growth if args.parallel == "fsdp" else "full",
               grow_op=args.grow_op, size=args.size, world_size=info.world_size,
               update_s=statistics.median(times), peak_mib=peak / 1024, peak_over_start_mib=(peak - rss0) / 1024,
               grow_s=grow_s, grow_peak_mib=grow_peak / 1024, grow_peak_over_start_mib=(grow_peak - rss1) / 1024,
               n_params=sum(p.numel() for p in GPT(config).parameters()))
    Path(args.out).joinpath(f"{out['parallel']}-{out['growth']}-{info.rank}.json").write_text(json.dumps(out))
    D.close(info)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--size", default="small")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--grow_op", default="width", help="the growth op measured (default width)")
    p.add_argument("--growth", choices=("sharded", "gather"), default="sharded",
                   help="(worker) fsdp growth: inside the shards or gather-grow-reshard")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default=None, help="(worker) one mode")
    p.add_argument("--out", default=None, help="(worker) folder for per-rank JSON")
    p.add_argument("--json", default=None, help="write all rows here")
    args = p.parse_args()
    if args.parallel is not None:
        worker(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for parallel, growth in (("ddp", "full"), ("fsdp", "sharded"), ("fsdp", "gather")):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   __file__, "--parallel", parallel, "--out", tmp, "--size", args.size, "--steps", str(args.steps),
                   "--batch_size", str(args.batch_size), "--seqlen", str(args.seqlen), "--grow_op", args.grow_op]
            if parallel == "fsdp":
                cmd += ["--growth", growth]
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{parallel} ({growth} growth) failed:\n{proc.stderr[-3000:]}")
            rows += [json.loads(f.read_text()) for f in sorted(Path(tmp).glob(f"{parallel}-{growth}-*.json"))]
    print(f"{args.size}, {args.nproc} CPU processes (gloo), batch {args.batch_size} x {args.seqlen}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, growth op {args.grow_op}")
    print(f"{'mode':5} {'growth':>7} {'rank':>4} {'update s':>9} {'peak MiB':>9} {'+MiB':>7} {'grow s':>7} "
          f"{'grow peak':>10} {'+MiB':>7}")
    for r in rows:
        print(f"{r['parallel']:5} {r['growth']:>7} {r['rank']:>4} {r['update_s']:9.3f} {r['peak_mib']:9.0f} "
              f"{r['peak_over_start_mib']:7.0f} {r['grow_s']:7.2f} {r['grow_peak_mib']:10.0f} "
              f"{r['grow_peak_over_start_mib']:7.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
