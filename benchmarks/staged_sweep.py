"""Staged vs direct, firm: several seeds, width and depth growth, against a direct baseline whose peak LR
is tuned per seed; growth by the schedule plan and by the online slope rule.

For each seed s:
- direct: the target model from scratch at each LR of --lrs; the tuned baseline is the LR with the best
  final validation loss (per seed).
- staged, for each op (width: `width` on the half-width preset; depth: `alternate_id` on the half-depth
  preset) and each strategy (plan: the schedule module's one-growth plan; slope: `--grow_when slope`):
  trained at the tuned LR, so the grown model's stage uses the direct run's best LR.
Every run is one `python -m staged_fast.train` subprocess under <out>/seed<s>/..., as in
`staged_vs_direct.py` (same seed, data order, tokens per update, validation batches, dropout 0, FLOPs
formula and crossing rule: see that file's docstring). Reported per (seed, op, strategy) and as mean +/- sd
over seeds: FLOPs each run needs to reach the tuned direct run's final loss L*, the saving, the final-loss
difference at equal FLOPs (the staged run's final loss minus the direct curve's loss at the staged run's
total FLOPs; negative = staged ahead), and the wall-clock to L* of both runs (same thread count, run back
to back; each run's load average is recorded), measured and at each model shape's median throughput (the
figure that a burst of other load on a shared machine does not move).

Resumable: every run checkpoints every tenth of its updates and is started with `--resume latest` (a fresh
start when it has no checkpoint), and finished runs are skipped, so an interrupted sweep continues where
it stopped when given the same command. `--analyze_only` rebuilds the tables and the figure from the runs.

    python benchmarks/staged_sweep.py --quick                 # tiny, 3 seeds x {width, depth}: ~1 h on 2 cores
    python benchmarks/staged_sweep.py                         # small (4L/256d): the 2-3 hour sweep
    python benchmarks/staged_sweep.py --gpu --seeds 1 --data CORPUS --vocab gpt2
                                      # 6L/384d, T 512, bf16: ~6 min on one H100; CORPUS: 26M+ tokens
                                      # (each run reads 24.6M; data a run would read twice is refused)
    python benchmarks/staged_sweep.py --analyze_only [--quick]

Writes <out>/sweep.json (every number, argv, loads), <out>/sweep.md (the tables) and <out>/sweep.png
(every seed's curves, validation loss against FLOPs and against wall time, one column per op).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import staged_vs_direct as svd  # noqa: E402
from staged_fast.cli_help import HelpFormatter  # noqa: E402
from staged_fast.cli_types import non_negative_float, unit_interval  # noqa: E402

OPS = {"width": ("_div2_width", "width"), "depth": ("_div2_depth", "alternate_id")}
# (target, start suffix, seqlen, batch, S, warmup, val_every, val_batches); --gpu uses explicit shapes.
MODES = {
    "quick": dict(target="tiny", seqlen=64, batch_size=8, train_steps=600, warmup_steps=30, val_every=20,
                  val_batches=8, lrs=(1e-3, 2e-3, 4e-3)),
    "full": dict(target="small", seqlen=128, batch_size=8, train_steps=1200, warmup_steps=60, val_every=20,
                 val_batches=10, lrs=(6e-4, 1.2e-3, 2.4e-3)),
    "gpu": dict(target=(6, 384, 4), seqlen=512, batch_size=32, train_steps=1500, warmup_steps=75, val_every=50,
                val_batches=8, lrs=(1e-3, 2e-3, 4e-3)),
}


def shape_args(shape) -> list[str]:
    """--size for a preset name, explicit --n_layer/--n_embd/--n_head for a (L, d, H) shape."""
    if isinstance(shape, str):
        return ["--size", shape]
    n_layer, n_embd, n_head = shape
    return ["--n_layer", str(n_layer), "--n_embd", str(n_embd), "--n_head", str(n_head)]


def start_shape(target, op: str):
    if isinstance(target, str):
        return target + OPS[op][0]
    n_layer, n_embd, n_head = target
    return (n_layer, n_embd // 2, n_head // 2) if op == "width" else (n_layer // 2, n_embd, n_head)


def target_config(target, seqlen: int):
    from staged_fast.config import GPTConfig, preset_config

    if isinstance(target, str):
        return preset_config(target, n_positions=seqlen)
    n_layer, n_embd, n_head = target
    return GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=seqlen)


def run_args(cfg: dict, tokenizer: str, cache_dir: str | None, seed: int, lr: float, gpu: bool,
             data: list[str] | None = None, val_fraction: float = 0.01) -> list[str]:
    """The trainer flags every run of the sweep shares; resumable (checkpoints, --resume latest)."""
    base = [a for a in svd.common_args(cfg, tokenizer, cache_dir, seed) if a != "--overwrite"]
    i = base.index("--save_every")
    base[i + 1] = str(max(1, cfg["train_steps"] // 10))
    base += ["--lr", f"{lr:g}", "--resume", "latest", "--val_fraction", f"{val_fraction:g}"]
    if data:
        base += ["--data", *data]
    if gpu:
        base[base.index("--kernels") + 1] = "auto"
        base[base.index("--device") + 1] = "cuda"
        base += ["--bf16"]
    return base


def check_data(cfg: dict, tokenizer: str, data: list[str] | None, val_fraction: float, cache_dir: str | None,
               seeds: list[int]) -> None:
    """Refuse data that cannot carry the sweep, before any run: every run must read at most one epoch (more,
    and the direct runs overfit, so their final loss, the target L* and the LR they pick reward the staged run
    for training the big model less), and the validation split must fill --val_batches batches (the
    trainer stops at the first validation without one). The data is tokenized here as the runs will read it
    (same cache), once per seed: the seed picks the held-out documents."""
    from staged_fast.data import DataError, prepare_data
    from staged_fast.data.sampler import num_windows
    from staged_fast.tokenizer import load_tokenizer

    T, B, S, V = cfg["seqlen"], cfg["batch_size"], cfg["train_steps"], cfg["val_batches"]
    tok = load_tokenizer(tokenizer)
    splits = []  # (train tokens, validation tokens) per seed
    for seed in seeds:
        try:
            d = prepare_data(data, tok, tokenizer_name=tokenizer, cache_dir=cache_dir or "~/.cache/staged_fast",
                             val_fraction=val_fraction, seed=seed)
        except DataError as e:  # its message names the problem and the fix
            raise SystemExit(f"staged_sweep: --data: {e}") from None
        splits.append((len(d.train), len(d.val)))
    total = min(t + v for t, v in splits)
    val_short = any(num_windows(v, T) < V * B for _, v in splits)
    # the split holds out whole documents up to at least the share's tokens: the share of V*B windows (+ one)
    share = min(0.5, math.ceil(1e4 * 1.02 * ((V * B + 1) * T + 1) / total) / 1e4) if val_short else val_fraction
    fitting_steps = int(0.95 * total * (1 - share) / (T + 1)) // B  # with the validation share named below
    problems = []
    train_tokens = min(t for t, _ in splits)
    if S * B > num_windows(train_tokens, T):
        problems.append(
            f"each run reads {S * B * T / 1e6:.1f}M training tokens ({S} updates x {B} x {T}) but the data holds "
            f"{train_tokens / 1e6:.2f}M: {S * B * T / train_tokens:.1f} epochs. Fix: --data with a corpus of at "
            f"least {S * B * (T + 1) / (1 - share) / 1e6:.0f}M tokens, or --train_steps {fitting_steps} or fewer.")
    if val_short:
        fewest = min(num_windows(v, T) for _, v in splits)
        problems.append(
            f"the validation split holds as few as {fewest} samples of seqlen {T}, fewer than --val_batches {V} x "
            f"batch {B}. Fix: --val_fraction {share:.3g} (now {val_fraction:g}), or more data.")
    if problems:
        raise SystemExit(f"staged_sweep: the data ({d.source}; seeds {', '.join(map(str, seeds))}) cannot carry "
                         f"this sweep:\n- " + "\n- ".join(problems))


def run(name: str, run_dir: Path, argv: list[str], train_steps: int, log) -> dict:
    """Train (or skip a finished run); returns the load averages around it and its process wall time."""
    if svd.finished(run_dir, train_steps):
        log(f"{name}: finished earlier, reused ({run_dir})")
        return {}
    load_before = os.getloadavg()
    log(f"{name}: training -> {run_dir}")
    wall = svd.run_train(argv, run_dir, log)
    return dict(process_wall_s=wall, load_before=load_before, load_after=os.getloadavg())


def record(loads: dict, out: Path, run_dir: Path, info: dict) -> None:
    """Keep a run's load record; a reused run (info empty) keeps the one from when it trained."""
    if info or str(run_dir.relative_to(out)) not in loads:
        loads[str(run_dir.relative_to(out))] = info


def loss_at_flops(points: list[dict], flops: float) -> float | None:
    """The curve's validation loss at `flops`, interpolated linearly in log10(FLOPs); None past its end."""
    for k in range(1, len(points)):
        p, q = points[k - 1], points[k]
        if p["flops"] <= flops <= q["flops"]:
            frac = (math.log10(flops) - math.log10(p["flops"])) / (math.log10(q["flops"]) - math.log10(p["flops"]))
            return p["val_loss"] + frac * (q["val_loss"] - p["val_loss"])
    return None


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def analyze(out: Path, cfg: dict, seeds, ops, strategies, vocab_size: int, loads: dict) -> dict:
    curve = lambda d: svd.build_curve(*svd.read_run(d), seqlen=cfg["seqlen"], vocab_size=vocab_size,  # noqa: E731
                                      val_every=cfg["val_every"])
    result = dict(config={k: v for k, v in cfg.items() if k != "lrs"}, lrs=list(cfg["lrs"]), seeds={}, summary={})
    for seed in seeds:
        root = out / f"seed{seed}"
        direct = {lr: curve(root / f"direct_lr{lr:g}") for lr in cfg["lrs"]}
        best_lr = min(direct, key=lambda lr: direct[lr][-1]["val_loss"])
        entry = dict(direct_final_loss={f"{lr:g}": c[-1]["val_loss"] for lr, c in direct.items()},
                     tuned_lr=best_lr, runs={}, curves={"direct": direct[best_lr]})
        for op in ops:
            for strategy in strategies:
                key = f"{op}_{strategy}"
                staged = curve(root / f"staged_{key}")
                c = svd.compare(direct[best_lr], staged, svd.read_run(root / f"staged_{key}")[1])
                # at the staged run's total compute (the smaller one): its final loss minus the direct curve's
                # loss at those FLOPs (negative: staged is ahead at equal compute)
                direct_there = loss_at_flops(direct[best_lr], c["staged_total_flops"])
                c["final_loss_diff_at_equal_flops"] = (
                    None if direct_there is None else c["staged_final_loss"] - direct_there)
                c["wall_to_target_s"] = dict(direct=(c["direct"] or {}).get("wall_s"),
                                             staged=(c["staged"] or {}).get("wall_s"))
                entry["runs"][key] = c
                entry["curves"][key] = staged
        result["seeds"][str(seed)] = entry
    for op in ops:
        for strategy in strategies:
            key = f"{op}_{strategy}"
            runs = [result["seeds"][str(s)]["runs"][key] for s in seeds]
            summary = {}
            for name, get in (("flops_saving", lambda r: r.get("flops_saving")),
                              ("wall_saving", lambda r: r.get("wall_saving")),
                              ("wall_nominal_saving", lambda r: r.get("wall_nominal_saving")),
                              ("final_loss_diff_at_equal_flops", lambda r: r.get("final_loss_diff_at_equal_flops"))):
                mean, sd = mean_sd([get(r) for r in runs])
                summary[name] = dict(mean=mean, sd=sd)
            summary["reached"] = sum(r["reached"] for r in runs)
            result["summary"][key] = summary
    result["loads"] = loads
    return result


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def tables(res: dict, seeds, ops, strategies) -> str:
    lines = ["| seed | tuned LR | op | growth by | FLOPs to L*: direct | staged | saving | loss diff at equal FLOPs "
             "| wall to L*: direct | staged | at median throughput: direct | staged |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for seed in seeds:
        e = res["seeds"][str(seed)]
        for op in ops:
            for strategy in strategies:
                r = e["runs"][f"{op}_{strategy}"]
                d, s = r["direct"] or {}, r["staged"] or {}
                diff = r["final_loss_diff_at_equal_flops"]
                lines.append(
                    f"| {seed} | {e['tuned_lr']:g} | {op} | {strategy} | {svd._fmt_flops(d.get('flops'))} | "
                    f"{svd._fmt_flops(s.get('flops'))} | {_pct(r.get('flops_saving'))} | "
                    f"{'n/a' if diff is None else f'{diff:+.4f}'} | {svd._fmt_s(d.get('wall_s'))} | "
                    f"{svd._fmt_s(s.get('wall_s'))} | {svd._fmt_s(d.get('wall_nominal_s'))} | "
                    f"{svd._fmt_s(s.get('wall_nominal_s'))} |")
    lines += ["", "| op | growth by | FLOPs saving, mean +/- sd | wall-clock saving, mean +/- sd | "
              "wall-clock saving at median throughput, mean +/- sd | loss diff at equal FLOPs, mean +/- sd "
              "| seeds reaching L* |", "|---|---|---:|---:|---:|---:|---:|"]
    for op in ops:
        for strategy in strategies:
            sm = res["summary"][f"{op}_{strategy}"]

            def fmt(name, pct=True):
                m, sd = sm[name]["mean"], sm[name]["sd"]
                if m is None:
                    return "n/a"
                return f"{100 * m:.1f}% +/- {100 * sd:.1f}" if pct else f"{m:+.4f} +/- {sd:.4f}"

            lines.append(f"| {op} | {strategy} | {fmt('flops_saving')} | {fmt('wall_saving')} | "
                         f"{fmt('wall_nominal_saving')} | "
                         f"{fmt('final_loss_diff_at_equal_flops', pct=False)} | {sm['reached']}/{len(seeds)} |")
    return "\n".join(lines)


def figure(res: dict, seeds, ops, strategies, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(ops), figsize=(6 * len(ops), 8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, op in enumerate(ops):
        for i, (xkey, xlabel) in enumerate((("flops", "training FLOPs"), ("wall_s", "wall time (s)"))):
            ax = axes[i][j]
            for k, seed in enumerate(seeds):
                curves = res["seeds"][str(seed)]["curves"]
                color = colors[k % len(colors)]
                d = curves["direct"]
                ax.plot([p[xkey] for p in d], [p["val_loss"] for p in d], color=color, lw=1.5,
                        label=f"direct, seed {seed}")
                for strategy, style in zip(strategies, ("--", ":")):
                    s = curves[f"{op}_{strategy}"]
                    ax.plot([p[xkey] for p in s], [p["val_loss"] for p in s], color=color, ls=style, lw=1.2,
                            label=f"staged {strategy}, seed {seed}")
            ax.set_xscale("log" if xkey == "flops" else "linear")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation loss")
            ax.set_title(f"{op} growth: loss vs {xlabel}")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny (2L/128d) target, 600 updates per run")
    mode.add_argument("--gpu", action="store_true", help="6L/384d/4H target, T 512, bf16 on CUDA")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    p.add_argument("--ops", default="width,depth", help="comma-separated: width, depth")
    p.add_argument("--strategies", default="plan,slope", help="comma-separated: plan, slope")
    p.add_argument("--lrs", default=None, help="comma-separated peak LRs of the direct runs (default: the mode's)")
    p.add_argument("--train_steps", type=int, default=None, help="updates per run (default: the mode's)")
    p.add_argument("--vocab", default="bpe2048", help="'gpt2' or 'bpeN' (see staged_vs_direct.py)")
    p.add_argument("--width_noise", type=non_negative_float, default=0.01, help="symmetry-breaking split of width growth")
    p.add_argument("--out", default=None, help="sweep folder (default runs/staged_sweep_<mode>)")
    p.add_argument("--cache_dir", default=None, help="tokenized-data cache (default: the trainer's)")
    p.add_argument("--data", nargs="+", default=None,
                   help="the trainer's --data (default: the bundled corpus, 1.6M tokens: too small for --gpu; "
                        "with a corpus of your own, --vocab gpt2 tokenizes it with GPT-2's BPE)")
    p.add_argument("--val_fraction", type=unit_interval, default=0.01, help="the trainer's --val_fraction")
    p.add_argument("--analyze_only", action="store_true", help="rebuild the tables and figure from the runs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mode = "quick" if args.quick else "gpu" if args.gpu else "full"
    cfg = dict(MODES[mode])
    if args.lrs:
        cfg["lrs"] = tuple(float(x) for x in args.lrs.split(","))
    if args.train_steps:
        cfg["train_steps"] = args.train_steps
    seeds = [int(s) for s in args.seeds.split(",")]
    ops = args.ops.split(",")
    strategies = args.strategies.split(",")
    bad = [o for o in ops if o not in OPS] + [s for s in strategies if s not in ("plan", "slope")]
    if bad:
        raise SystemExit(f"unknown --ops/--strategies {bad}; ops: width, depth; strategies: plan, slope")
    out = Path(args.out or f"runs/staged_sweep_{mode}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.vocab == "gpt2":
        tokenizer, vocab_size = "gpt2", svd.GPT2_VOCAB
    elif args.vocab.startswith("bpe") and args.vocab[3:].isdigit():
        vocab_size = int(args.vocab[3:])
        tokenizer = str(out / f"tokenizer_{args.vocab}")
        if not args.analyze_only:
            svd.make_tokenizer(Path(tokenizer), vocab_size)
    else:
        raise SystemExit(f"--vocab: 'gpt2' or 'bpeN', got {args.vocab!r}")

    S = cfg["train_steps"]
    loads_path = out / "loads.json"
    loads = json.loads(loads_path.read_text()) if loads_path.exists() else {}
    if not args.analyze_only:
        import torch

        check_data(cfg, tokenizer, args.data, args.val_fraction, args.cache_dir, seeds)
        log(f"sweep {mode}: seeds {seeds}, ops {ops}, strategies {strategies}, direct LRs {cfg['lrs']}, "
            f"{S} updates per run, torch threads {torch.get_num_threads()}")
        for seed in seeds:
            root = out / f"seed{seed}"
            for lr in cfg["lrs"]:
                d = root / f"direct_lr{lr:g}"
                argv = [*shape_args(cfg["target"]), "--save_prefix", str(d),
                        *run_args(cfg, tokenizer, args.cache_dir, seed, lr, args.gpu, args.data, args.val_fraction)]
                record(loads, out, d, run(f"seed {seed} direct lr {lr:g}", d, argv, S, log))
                loads_path.write_text(json.dumps(loads, indent=1))
            finals = {lr: svd.read_run(root / f"direct_lr{lr:g}")[0][-1]["val_loss"] for lr in cfg["lrs"]}
            best_lr = min(finals, key=finals.get)
            for op in ops:
                for strategy in strategies:
                    d = root / f"staged_{op}_{strategy}"
                    argv = ["--save_prefix", str(d), "--width_noise", str(args.width_noise),
                            *run_args(cfg, tokenizer, args.cache_dir, seed, best_lr, args.gpu, args.data,
                                     args.val_fraction)]
                    if strategy == "plan":
                        plan_path = root / f"plan_{op}.json"
                        svd.make_plan(target_config(cfg["target"], cfg["seqlen"]), S, plan_path, op=op)
                        argv += ["--schedule", str(plan_path)]
                    else:
                        argv += [*shape_args(start_shape(cfg["target"], op)), "--grow_when", "slope",
                                 "--grow_ops", OPS[op][1], "--restart_steps", "auto",
                                 "--restart_warmup_steps", str(round(0.1 * S))]
                    record(loads, out, d, run(f"seed {seed} staged {op} {strategy}", d, argv, S, log))
                    loads_path.write_text(json.dumps(loads, indent=1))
    res = analyze(out, cfg, seeds, ops, strategies, vocab_size, loads)
    res.update(mode=mode, vocab=args.vocab, vocab_size=vocab_size, width_noise=args.width_noise)
    from benchmarks.harness import write_json

    write_json(out / "sweep.json", res)
    text = tables(res, seeds, ops, strategies)
    (out / "sweep.md").write_text(text + "\n")
    figure(res, seeds, ops, strategies, out / "sweep.png")
    print(text)
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
