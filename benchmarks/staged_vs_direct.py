"""Staged vs direct training: the paper's claim (Shen et al. 2022) at a scale a CPU trains in under an hour.

Two runs of `python -m staged_fast.train`, each its own subprocess and --save_prefix under --out:
- direct: the target model (e.g. `small`, 4L/256d/4H) from scratch for S optimizer steps;
- staged: the half-width model (`small_div2_width`) grown in memory with the function-preserving `width`
  operator into the target, then trained on; its LR schedule ends at the same step counter S.
Same seed, same data order (the sampler is seeded by --seed and both runs draw one batch per update),
same tokens per update, same validation batches, dropout 0 in both (so the width growth is exactly
function-preserving: the loss right after growth equals the loss right before; the growth event logs both).
With dropout 0 a plain-copy width growth leaves the two halves identical forever (they get identical
gradients), so the staged run grows with the trainer's function-preserving symmetry-breaking split,
--width_noise (default 0.01 here; 0 reproduces the plain copy).

When to grow (--strategy):
- plan (default): the schedule module's law-optimal plan (`plan_for_run(target, ["width"], N)`): stage 0
  takes the law's fraction of the run, the step counter restarts at R = S_grow / 1.776 with a restart LR
  warmup of 10% of the next stage; N is chosen so that the plan's final schedule step equals S, so the
  staged run's LR schedule ends where the direct run's does. No oracle: nothing reads the direct curve.
- fixed: grow after --grow_at updates, R = S_grow / constant_op ('auto'), --restart_warmup steps.
- slope: `--grow_when slope`, the trainer's online slope rule on its own validation curve.

What is measured (from each run's metrics.jsonl):
- FLOPs per trained token of a model of L layers, width d, vocabulary V at sequence length T:
      f(L, d) = 6 * (12 L d^2 + V d) + 12 L d T
  6 FLOPs per weight per token (forward + backward) over the non-embedding matmul weights (12 L d^2) and the
  tied LM head (V d), plus attention scores and values (12 L d T; the causal mask's halving not applied).
  Biases, layer norms and the embedding lookups are left out (elementwise), as is validation.
  The compute of a run is integrated update by update over the shape that took each update: updates
  1..G use the small model's f, updates after the growth event at iteration G the grown model's.
- Wall time: the trainer's own clock per log interval (tokens in the interval / tokens_per_s), summed: it
  covers training steps, the periodic validation and the growth, not process start-up or data loading.
- The target loss L* is the direct run's final validation loss. For each run, the FLOPs (and wall time) to
  reach L* is found at the first validation point with loss <= L*, interpolated linearly in log10(FLOPs)
  between it and the point before (wall time linearly with the same fraction).
- saving = 1 - FLOPs_staged(L*) / FLOPs_direct(L*). If the staged run never reaches L*, the script says so
  and reports the reverse comparison (FLOPs each needs to reach the staged run's final loss).

Vocabulary (--vocab): with GPT-2's 50257 tokens, the tied LM head (V d) is 80% of a 4L/256d model's matmul
FLOPs and 89% of the half-width model's, so halving the width barely halves the step cost; at GPT2_base the
head is 31% of the FLOPs, at GPT2_large 10%. The default, `bpe2048`, trains a byte-level BPE tokenizer of
2048 tokens on the bundled corpus (written under --out) so the head's share is paper-like; `--vocab gpt2`
runs with the real GPT-2 BPE for comparison.

    python benchmarks/staged_vs_direct.py --quick          # a few minutes on 2 CPU cores
    python benchmarks/staged_vs_direct.py                  # the full experiment (~20-40 min on 2 shared cores)
    python benchmarks/staged_vs_direct.py --analyze_only   # re-analyze finished runs under --out
    python benchmarks/staged_vs_direct.py --arch llama     # the same on llama_small (--quick: llama_tiny)

Writes <out>/staged_vs_direct_<staged run>.json and .png (e.g. staged_vs_direct_staged_plan_noise0.01.json)
and prints a table; the staged run's folder is <out>/staged_<strategy>_noise<width_noise>.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from staged_fast.cli_help import HelpFormatter  # noqa: E402
from staged_fast.cli_types import non_negative_float  # noqa: E402

GPT2_VOCAB = 50257

# Experiment sizes. S = the direct run's optimizer steps (and the staged run's final schedule step).
MODES = {
    "quick": dict(target="tiny", start="tiny_div2_width", seqlen=64, batch_size=8, train_steps=1500,
                  warmup_steps=75, val_every=10, val_batches=8),
    "full": dict(target="small", start="small_div2_width", seqlen=128, batch_size=8, train_steps=1200,
                 warmup_steps=60, val_every=20, val_batches=10),
}
# --arch llama: the same experiments on the llama presets (head_dim 32, n_kv_head = n_head / 2).
LLAMA_SIZES = {"quick": dict(target="llama_tiny", start="llama_tiny_div2_width"),
               "full": dict(target="llama_small", start="llama_small_div2_width")}

# ---------------------------------------------------------------------------------------------- FLOPs
def non_embedding_params(n_layer: int, n_embd: int) -> int:
    """Matmul weights of the transformer blocks: 4 d^2 attention + 8 d^2 MLP per layer (Kaplan's N)."""
    return 12 * n_layer * n_embd * n_embd


def flops_per_token(n_layer: int, n_embd: int, seqlen: int, vocab_size: int, n_params: int | None = None) -> float:
    """Training FLOPs per token: 6 * (N + V d) + 12 L d T with N = 12 L d^2 (see the module docstring), or
    the llama model's exact non-embedding matmul count `n_params` (q/k/v/o with GQA, gate/up/down)."""
    n = non_embedding_params(n_layer, n_embd) if n_params is None else n_params
    return 6.0 * (n + vocab_size * n_embd) + 12.0 * n_layer * n_embd * seqlen


def llama_matmul_params(n_layer: int, n_embd: int, n_head: int, n_kv_head: int, hidden: int) -> int:
    head_dim = n_embd // n_head
    return n_layer * (2 * n_embd * n_head * head_dim + 2 * n_embd * n_kv_head * head_dim + 3 * n_embd * hidden)


def parse_shape(text: str) -> tuple[int, ...]:
    """'2L/64d/1H' -> (2, 64); a llama shape '2L/64d/2H/1KV/192F' -> (2, 64, its matmul parameter count)."""
    parts = text.split("/")
    if len(parts) < 2 or not parts[0].endswith("L") or not parts[1].endswith("d"):
        raise ValueError(f"not a model shape like '2L/64d/1H': {text!r}")
    L, d = int(parts[0][:-1]), int(parts[1][:-1])
    if len(parts) == 5 and parts[3].endswith("KV") and parts[4].endswith("F"):
        return L, d, llama_matmul_params(L, d, int(parts[2][:-1]), int(parts[3][:-2]), int(parts[4][:-1]))
    return L, d


# ---------------------------------------------------------------------------------------------- curves
def read_run(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(log records, growth events) of a run's metrics.jsonl, in file order."""
    records, events = [], []
    with open(Path(run_dir) / "metrics.jsonl") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            (events if rec.get("event") == "growth" else records).append(rec)
    return records, events


def build_curve(records: list[dict], events: list[dict], *, seqlen: int, vocab_size: int,
                val_every: int | None = None, shape: tuple | None = None) -> list[dict]:
    """Validation points with the cumulative training FLOPs and wall time at each.

    A record's val_loss is fresh when its iteration is a multiple of val_every, or it is the last record
    (the trainer validates at the final step); others carry a stale value and give no point. FLOPs integrate
    f(shape) over updates: the shape changes after each growth event's iteration.
    """
    records = sorted(records, key=lambda r: r["iteration"])
    events = sorted(events, key=lambda e: e["iteration"])
    if not records:
        raise ValueError("no log records")
    if events:
        shape0 = parse_shape(events[0]["old_size"])
    elif shape is not None:
        shape0 = shape
    else:
        shape0 = (records[0]["n_layer"], records[0]["n_embd"])
    # segments: (first update of the segment, shape)
    segments = [(1, shape0)] + [(e["iteration"] + 1, parse_shape(e["new_size"])) for e in events]

    def flops_between(it0: int, it1: int, tokens_per_update: float) -> float:
        total = 0.0
        for k, (start, shape) in enumerate(segments):
            end = segments[k + 1][0] - 1 if k + 1 < len(segments) else math.inf
            lo, hi = max(it0 + 1, start), min(it1, end)
            if hi >= lo:
                total += (hi - lo + 1) * tokens_per_update * flops_per_token(shape[0], shape[1], seqlen, vocab_size,
                                                                             *shape[2:])
        return total

    # the median throughput of each shape: a wall-time estimate robust to other load on a shared machine
    by_shape: dict[tuple, list[float]] = {}
    for r in records:
        if r.get("tokens_per_s"):
            by_shape.setdefault((r["n_layer"], r["n_embd"]), []).append(r["tokens_per_s"])
    median_tps = {k: statistics.median(v) for k, v in by_shape.items()}

    points = []
    prev_it, prev_tokens, flops, wall, wall_nominal = 0, 0, 0.0, 0.0, 0.0
    for i, r in enumerate(records):
        it, tokens = r["iteration"], r["tokens"]
        if it > prev_it:
            flops += flops_between(prev_it, it, (tokens - prev_tokens) / (it - prev_it))
            if r.get("tokens_per_s"):
                wall += (tokens - prev_tokens) / r["tokens_per_s"]
                wall_nominal += (tokens - prev_tokens) / median_tps[(r["n_layer"], r["n_embd"])]
        prev_it, prev_tokens = it, tokens
        last = i == len(records) - 1
        fresh = val_every is None or it % val_every == 0 or last
        if r.get("val_loss") is None or not fresh:
            continue
        points.append(dict(iteration=it, step=r["step"], tokens=tokens, flops=flops, wall_s=wall,
                           wall_nominal_s=wall_nominal, val_loss=float(r["val_loss"]), n_layer=r["n_layer"], n_embd=r["n_embd"]))
    return points


_TIME_KEYS = ("wall_s", "wall_nominal_s")


def crossing(points: list[dict], target_loss: float) -> dict | None:
    """FLOPs, wall time and iteration at which the curve first reaches target_loss (<=).

    Linear interpolation in log10(FLOPs) between the first point at or below the target and the point
    before it; wall time and iteration are interpolated with the same fraction. None if never reached.
    """
    for k, p in enumerate(points):
        if p["val_loss"] <= target_loss:
            if k == 0 or p["val_loss"] == target_loss:
                out = dict(flops=p["flops"], iteration=float(p["iteration"]), interpolated=False)
                out.update({key: p[key] for key in _TIME_KEYS if key in p})
                return out
            q = points[k - 1]
            frac = (q["val_loss"] - target_loss) / (q["val_loss"] - p["val_loss"])
            lf = math.log10(q["flops"]) + frac * (math.log10(p["flops"]) - math.log10(q["flops"]))
            out = dict(flops=10.0 ** lf, iteration=q["iteration"] + frac * (p["iteration"] - q["iteration"]),
                       interpolated=True)
            out.update({key: q[key] + frac * (p[key] - q[key]) for key in _TIME_KEYS if key in p})
            return out
    return None


def compare(direct: list[dict], staged: list[dict], events: list[dict] | None = None) -> dict:
    """The headline numbers: compute and wall time of each run to reach the direct run's final val loss."""
    target = direct[-1]["val_loss"]
    cd, cs = crossing(direct, target), crossing(staged, target)
    out = dict(target_loss=target, direct_final_loss=target, staged_final_loss=staged[-1]["val_loss"],
               direct_total_flops=direct[-1]["flops"], staged_total_flops=staged[-1]["flops"],
               direct_total_wall_s=direct[-1]["wall_s"], staged_total_wall_s=staged[-1]["wall_s"],
               direct=cd, staged=cs, reached=cs is not None)
    if cs is not None:
        out.update(flops_ratio=cs["flops"] / cd["flops"], flops_saving=1.0 - cs["flops"] / cd["flops"])
        for key, name in (("wall_s", "wall"), ("wall_nominal_s", "wall_nominal")):
            ratio = cs[key] / cd[key] if cd.get(key) and key in cs else None
            out[f"{name}_ratio"] = ratio
            out[f"{name}_saving"] = None if ratio is None else 1.0 - ratio
    else:  # the reverse comparison at the staged run's final loss, which both curves reach
        ls = staged[-1]["val_loss"]
        rd = crossing(direct, ls)
        out["reverse"] = dict(target_loss=ls, direct=rd, staged=crossing(staged, ls),
                              flops_ratio=None if rd is None else staged[-1]["flops"] / rd["flops"])
    if events:
        g = events[0]
        # the paper's equal-loss restart: the step at which the direct (from-scratch target) run reaches the
        # staged run's loss at growth; S_grow / that = the measured constant_op
        grow_points = [p for p in staged if p["iteration"] <= g["iteration"]]
        l_grow = grow_points[-1]["val_loss"] if grow_points else g["loss_before"]
        s_grow = grow_points[-1]["step"] if grow_points else g["step_before"]  # the step of that val loss
        eq = crossing(direct, l_grow)
        out["growth"] = dict(
            iteration=g["iteration"], step_before=g["step_before"], step_after=g["step_after"],
            loss_before=g["loss_before"], loss_after=g["loss_after"],
            loss_jump=g["loss_after"] - g["loss_before"], old_size=g["old_size"], new_size=g["new_size"],
            val_loss_at_growth=l_grow,
            direct_iteration_at_equal_loss=None if eq is None else eq["iteration"],
            measured_constant_op=None if not eq or eq["iteration"] <= 0 else s_grow / eq["iteration"],
        )
    return out


# ---------------------------------------------------------------------------------------------- output
def _fmt_flops(x) -> str:
    return "n/a" if x is None else f"{x:.3e}"


def _fmt_s(x) -> str:
    return "n/a" if x is None else f"{x:.0f} s"


def table(res: dict) -> str:
    c = res["comparison"]
    d, s = c["direct"], c["staged"]
    lines = [
        f"target loss L* = direct final val loss = {c['target_loss']:.4f}; staged final val loss "
        f"{c['staged_final_loss']:.4f}",
        "| run | model(s) | FLOPs to L* | wall to L* | wall to L* (median throughput) | total FLOPs | total wall "
        "| final val loss |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| direct | {res['config']['target']} | {_fmt_flops(d['flops'])} | {_fmt_s(d['wall_s'])} | "
        f"{_fmt_s(d.get('wall_nominal_s'))} | {_fmt_flops(c['direct_total_flops'])} | "
        f"{_fmt_s(c['direct_total_wall_s'])} | {c['direct_final_loss']:.4f} |",
        f"| staged | {res['config']['start']} -> {res['config']['target']} | {_fmt_flops(s and s['flops'])} | "
        f"{_fmt_s(s and s['wall_s'])} | {_fmt_s(s and s.get('wall_nominal_s'))} | "
        f"{_fmt_flops(c['staged_total_flops'])} | {_fmt_s(c['staged_total_wall_s'])} | {c['staged_final_loss']:.4f} |",
    ]
    if c["reached"]:
        def ratio(name):
            r = c.get(f"{name}_ratio")
            return "n/a" if r is None else f"{r:.3f} ({100 * (1 - r):+.1f}% saved)"

        lines.append(f"staged/direct to L*: FLOPs {ratio('flops')}; wall time {ratio('wall')}; wall time at "
                     f"each shape's median throughput {ratio('wall_nominal')}")
    else:
        r = c["reverse"]
        lines.append(f"the staged run did NOT reach L*. Reverse check at its final loss {r['target_loss']:.4f}: "
                     f"direct needs {_fmt_flops(r['direct'] and r['direct']['flops'])}, staged used "
                     f"{_fmt_flops(c['staged_total_flops'])} (ratio "
                     f"{'n/a' if r['flops_ratio'] is None else format(r['flops_ratio'], '.3f')})")
    g = c.get("growth")
    if g:
        mc = g["measured_constant_op"]
        lines.append(
            f"growth {g['old_size']} -> {g['new_size']} after update {g['iteration']}: loss {g['loss_before']:.5f} -> "
            f"{g['loss_after']:.5f} (jump {g['loss_jump']:+.2e}); step counter {g['step_before']} -> "
            f"{g['step_after']}; direct reaches the staged val loss at growth ({g['val_loss_at_growth']:.4f}) at "
            f"update {'n/a' if g['direct_iteration_at_equal_loss'] is None else round(g['direct_iteration_at_equal_loss'])}"
            f" (measured constant_op {'n/a' if mc is None else format(mc, '.2f')}; trainer used 1.776)")
    return "\n".join(lines)


def plot(direct: list[dict], staged: list[dict], res: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = res["comparison"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "flops", "training FLOPs"),
                           (axes[1], "wall_nominal_s", "wall time at each shape's median throughput (s)")):
        xs_d = [p[key] for p in direct]
        xs_s = [p[key] for p in staged]
        ax.plot(xs_d, [p["val_loss"] for p in direct], label=f"direct {res['config']['target']}", color="C0")
        ax.plot(xs_s, [p["val_loss"] for p in staged],
                label=f"staged {res['config']['start']} -> {res['config']['target']}", color="C1")
        ax.axhline(c["target_loss"], color="gray", ls=":", lw=1, label=f"L* = {c['target_loss']:.3f}")
        g = c.get("growth")
        if g:
            gx = [p[key] for p in staged if p["iteration"] <= g["iteration"]]
            if gx:
                ax.axvline(gx[-1], color="C1", ls="--", lw=1, label="growth (width)")
        for run, col in (("direct", "C0"), ("staged", "C1")):
            cr = c[run]
            if cr is not None and key in cr:
                ax.plot([cr[key]], [c["target_loss"]], "o", color=col)
        if key == "flops":
            ax.set_xscale("log")
        lo = min(p["val_loss"] for p in direct + staged)
        ax.set_ylim(lo - 0.1, min(max(p["val_loss"] for p in direct + staged), lo + 2.5))
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    title = "staged vs direct"
    if c["reached"]:
        title += f": staged reaches L* with {100 * c['flops_saving']:.1f}% fewer FLOPs"
    else:
        title += ": staged does not reach L*"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- runs
def make_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A byte-level BPE of vocab_size tokens trained on the bundled corpus, saved as a HF fast tokenizer."""
    if (folder / "tokenizer.json").exists():
        return folder
    import lzma

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = REPO / "staged_fast" / "data" / "corpus.jsonl.xz"
    with lzma.open(corpus, "rt") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, unk_token=eos,
                            model_max_length=1024).save_pretrained(str(folder))
    return folder


def make_plan(target, train_steps: int, path: Path, op: str = "width") -> dict:
    """The schedule module's one-growth plan (`op`: width or depth), with its run length chosen so its
    final schedule step == train_steps. `target`: a preset name or a GPTConfig."""
    from staged_fast.schedule import constant_op, plan_for_run

    probe = plan_for_run(target, [op], train_steps).to_dict()
    # final = N - s0 + s0 / c: solve for N at the probe's stage-0 fraction, then search nearby
    frac = probe["stages"][0]["steps"] / probe["train_steps"]
    n0 = round(train_steps / (1.0 - frac * (1.0 - 1.0 / constant_op(op))))
    best = None
    for n in range(max(2, n0 - 4), n0 + 5):
        d = plan_for_run(target, [op], n).to_dict()
        key = (abs(d["final_schedule_step"] - train_steps), n)
        if best is None or key < best[0]:
            best = (key, n, d)
    plan = plan_for_run(target, [op], best[1])
    path.write_text(plan.to_json())
    return plan.to_dict()


def run_train(argv: list[str], run_dir: Path, log) -> float:
    """One trainer subprocess; its output goes to <run_dir>.log. Returns the process's wall time."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    logfile = run_dir.parent / (run_dir.name + ".log")
    cmd = [sys.executable, "-m", "staged_fast.train", *argv]
    log("  $ " + " ".join(cmd))
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = logfile.read_text()[-3000:]
        raise RuntimeError(f"training failed (exit {proc.returncode}); see {logfile}:\n{tail}")
    log(f"  done in {took:.0f} s")
    return took


def finished(run_dir: Path, train_steps: int) -> bool:
    try:
        records, _ = read_run(run_dir)
    except OSError:
        return False
    return bool(records) and records[-1]["step"] >= train_steps


def common_args(cfg: dict, tokenizer: str, cache_dir: str | None, seed: int) -> list[str]:
    a = ["--dropout", "0", "--seed", str(seed), "--seqlen", str(cfg["seqlen"]), "--n_positions", str(cfg["seqlen"]),
         "--batch_size", str(cfg["batch_size"]), "--train_steps", str(cfg["train_steps"]),
         "--warmup_steps", str(cfg["warmup_steps"]), "--val_every", str(cfg["val_every"]),
         "--val_batches", str(cfg["val_batches"]), "--log_rate", str(cfg["val_every"]),
         "--save_every", "1000000000", "--keep_last", "1", "--tokenizer", tokenizer, "--no_progress",
         "--overwrite", "--kernels", "torch", "--device", "cpu"]  # CPU-scale runs (staged_sweep --gpu: cuda)
    if cache_dir:
        a += ["--cache_dir", cache_dir]
    return a


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, 300 steps: a few minutes")
    p.add_argument("--out", default=None, help="run folder (default runs/staged_vs_direct[_quick]/)")
    p.add_argument("--cache_dir", default=None, help="tokenized-data cache (default: the trainer's)")
    p.add_argument("--strategy", default="plan", choices=("plan", "fixed", "slope"), help="when to grow")
    p.add_argument("--grow_at", type=int, default=None, help="fixed: grow after this many updates "
                   "(default: 35%% of --train_steps)")
    p.add_argument("--restart_warmup", type=int, default=None, help="fixed/slope: restart LR warmup steps "
                   "(default: 10%% of --train_steps)")
    p.add_argument("--vocab", default="bpe2048", help="'gpt2' (50257 tokens) or 'bpeN': a byte-level BPE of N "
                   "tokens trained on the bundled corpus")
    p.add_argument("--target", default=None, help="target preset (default: mode's)")
    p.add_argument("--start", default=None, help="start preset, the target at half width (default: mode's)")
    p.add_argument("--train_steps", type=int, default=None, help="direct run's steps S (default: mode's)")
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--val_every", type=int, default=None, help="updates between validations (= log rate)")
    p.add_argument("--val_batches", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--warmup_steps", type=int, default=None)
    p.add_argument("--width_noise", type=non_negative_float, default=0.01, help="std of the symmetry-breaking split of the "
                   "width growth (function-preserving; 0 = plain copy, whose two halves stay identical forever "
                   "with dropout 0, so the grown model never outgrows the small one)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--arch", default="gpt2", choices=("gpt2", "llama"), help="model family: llama runs the "
                   "llama_tiny / llama_small presets (FLOPs from their exact matmul parameter count)")
    p.add_argument("--reuse", action="store_true", help="skip a run whose metrics show it finished")
    p.add_argument("--analyze_only", action="store_true", help="analyze the runs already under --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mode = "quick" if args.quick else "full"
    cfg = dict(MODES[mode])
    if args.arch == "llama":
        cfg.update(LLAMA_SIZES[mode])
    for key in ("target", "start", "train_steps", "seqlen", "val_every", "val_batches", "batch_size",
                "warmup_steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    out = Path(args.out or f"runs/staged_vs_direct{'_llama' if args.arch == 'llama' else ''}"
                           f"{'_quick' if args.quick else ''}")
    if not out.is_absolute():
        out = Path.cwd() / out
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    if args.vocab == "gpt2":
        tokenizer, vocab_size = "gpt2", GPT2_VOCAB
    elif args.vocab.startswith("bpe") and args.vocab[3:].isdigit():
        vocab_size = int(args.vocab[3:])
        tokenizer = str(out / f"tokenizer_{args.vocab}")
        if not args.analyze_only:
            make_tokenizer(Path(tokenizer), vocab_size)
    else:
        raise SystemExit(f"--vocab: 'gpt2' or 'bpeN', got {args.vocab!r}")

    S = cfg["train_steps"]
    direct_dir, staged_dir = out / "direct", out / f"staged_{args.strategy}_noise{args.width_noise:g}"
    base = common_args(cfg, tokenizer, args.cache_dir, args.seed)
    direct_argv = ["--size", cfg["target"], "--save_prefix", str(direct_dir), *base]
    staged_argv = ["--save_prefix", str(staged_dir), "--width_noise", str(args.width_noise), *base]
    plan = None
    if args.strategy == "plan":
        plan_path = out / "plan.json"
        plan = make_plan(cfg["target"], S, plan_path)
        staged_argv += ["--schedule", str(plan_path)]
    elif args.strategy == "fixed":
        grow_at = args.grow_at or round(0.35 * S)
        warm = args.restart_warmup if args.restart_warmup is not None else round(0.1 * S)
        staged_argv += ["--size", cfg["start"], "--grow_at", str(grow_at), "--grow_ops", "width",
                        "--restart_steps", "auto", "--restart_warmup_steps", str(warm)]
    else:
        warm = args.restart_warmup if args.restart_warmup is not None else round(0.1 * S)
        staged_argv += ["--size", cfg["start"], "--grow_when", "slope", "--grow_ops", "width",
                        "--restart_steps", "auto", "--restart_warmup_steps", str(warm)]

    process_wall = {}
    if not args.analyze_only:
        for name, run_dir, run_argv in (("direct", direct_dir, direct_argv), ("staged", staged_dir, staged_argv)):
            if args.reuse and finished(run_dir, S):
                log(f"{name}: reusing {run_dir}")
                continue
            log(f"{name}: training -> {run_dir}")
            process_wall[name] = run_train(run_argv, run_dir, log)

    d_rec, d_ev = read_run(direct_dir)
    s_rec, s_ev = read_run(staged_dir)
    target_shape, start_shape = parse_shape_preset(cfg["target"]), parse_shape_preset(cfg["start"])
    direct = build_curve(d_rec, d_ev, seqlen=cfg["seqlen"], vocab_size=vocab_size, val_every=cfg["val_every"],
                         shape=target_shape)
    staged = build_curve(s_rec, s_ev, seqlen=cfg["seqlen"], vocab_size=vocab_size, val_every=cfg["val_every"],
                         shape=start_shape)
    comparison = compare(direct, staged, s_ev)
    res = dict(
        mode=mode, arch=args.arch, strategy=args.strategy, vocab=args.vocab, vocab_size=vocab_size, width_noise=args.width_noise,
        config=dict(cfg, seed=args.seed, tokens_per_update=cfg["seqlen"] * cfg["batch_size"]),
        flops_formula=("per token: 6*(N + V*d) + 12*L*d*T, N = " + ("the exact q/k/v/o + gate/up/down matmul count"
                       if args.arch == "llama" else "12*L*d^2") + "; integrated over updates"),
        flops_per_token=dict(
            target=flops_per_token(target_shape[0], target_shape[1], cfg["seqlen"], vocab_size, *target_shape[2:]),
            start=flops_per_token(start_shape[0], start_shape[1], cfg["seqlen"], vocab_size, *start_shape[2:])),
        crossing_rule="first val point <= L*, linear interpolation in log10(FLOPs) with the point before",
        comparison=comparison, plan=plan, process_wall_s=process_wall or None,
        argv=dict(direct=direct_argv, staged=staged_argv),
        curves=dict(direct=direct, staged=staged),
    )
    res["flops_per_token"]["ratio_start_to_target"] = res["flops_per_token"]["start"] / res["flops_per_token"]["target"]
    from benchmarks.harness import write_json

    stem = f"staged_vs_direct_{staged_dir.name}"
    write_json(out / f"{stem}.json", res)
    plot(direct, staged, res, out / f"{stem}.png")
    print(table(res))
    print(f"f(start)/f(target) = {res['flops_per_token']['ratio_start_to_target']:.3f} FLOPs per token "
          f"(V = {vocab_size}, T = {cfg['seqlen']})")
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return 0


def parse_shape_preset(name: str) -> tuple[int, ...]:
    """(n_layer, n_embd) of a GPT-2 preset; (n_layer, n_embd, matmul parameters) of a llama preset."""
    from staged_fast.config import LLAMA_PRESETS, PRESETS

    if name in LLAMA_PRESETS:
        return (*LLAMA_PRESETS[name][:2], llama_matmul_params(*LLAMA_PRESETS[name]))
    n_layer, n_embd, _ = PRESETS[name]
    return n_layer, n_embd


if __name__ == "__main__":
    sys.exit(main())
