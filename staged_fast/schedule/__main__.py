"""python -m staged_fast.schedule {analyze,plan,law,compare-curves}: when to grow, and what staged training saves."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..cli_help import HelpFormatter, quiet_on_closed_pipe
from ..cli_types import fraction, non_negative_float, out_file_problem, positive_float, positive_int
from ..config import LLAMA_PRESETS, PRESETS, ConfigError, GPTConfig, preset_config
from .planner import DEFAULT_RESTART_WARMUP_FRAC, plan_for_run, plot_formats, plot_plan
from .scaling_law import DEFAULT_BATCH_TOKENS, law_summary, optimality_step
from .slope import (DEFAULT_DEPTH_OP, DEPTH_OPS, RULES, SMOOTH_WINDOW, PairResult, analyze_logs, analyze_pair,
                    read_curve)


PRESET_NAMES = (*PRESETS, *LLAMA_PRESETS)


def _check_out_file(flag: str, path: str, example: str) -> None:
    problem = out_file_problem(flag, path, example)
    if problem:
        raise ConfigError(problem)


def _make_parent(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def _write_json(path: str, data) -> None:
    _make_parent(path)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    print(f"wrote {path}")


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def format_pairs(results: list[PairResult]) -> str:
    """A Markdown table (also readable in a terminal) of pair analyses."""
    rows = ["| small -> target | op | S_grow | L_grow | R | S_grow/R | constant_op | S_opt | L_opt | "
            "saving (R measured) | saving (R = S_grow/constant_op) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        rows.append(
            f"| {r.small} -> {r.target} | {r.op} | {_fmt(r.grow_step, '.0f')} | {_fmt(r.grow_loss, '.3f')} | "
            f"{_fmt(r.restart_step, '.0f')} | {_fmt(r.measured_constant, '.3f')} | {r.design_constant} | "
            f"{_fmt(r.opt_step, '.0f')} | {_fmt(r.opt_loss, '.3f')} | "
            f"{'n/a' if r.saving is None else f'{100 * r.saving:.1f}%'} | "
            f"{'n/a' if r.saving_design_constant is None else f'{100 * r.saving_design_constant:.1f}%'} |")
    notes = [f"- {r.small} -> {r.target}: {r.note}" for r in results if r.note]
    return "\n".join(rows + notes)


def _n_params_for(path: str, preset: str | None, n_params: int | None, which: str) -> int:
    if n_params is not None:
        return n_params
    name = preset or os.path.splitext(os.path.basename(path))[0]
    if name not in PRESET_NAMES:
        raise ConfigError(f"cannot tell the {which} model's size from {path!r}: pass --{which}_preset "
                          f"(one of {', '.join(PRESET_NAMES)}) or --{which}_params N.")
    return preset_config(name).n_params_non_embedding


def cmd_analyze(args) -> int:
    if args.rule == "authors" and args.smooth_x:
        raise ConfigError("--smooth_x belongs to --rule online; the authors' rule never smooths x.")
    if args.json:
        _check_out_file("--json", args.json, "analyze.json")
    if args.logs:
        results = analyze_logs(args.logs, args.batch_tokens, args.window, args.smooth_x, args.rule)
    else:
        if not (args.small and args.target and args.op):
            raise ConfigError("analyze needs SMALL.csv TARGET.csv --op OP, or --logs DIR.")
        small, target = read_curve(args.small), read_curve(args.target)
        small_params = _n_params_for(args.small, args.small_preset, args.small_params, "small")
        target_params = _n_params_for(args.target, args.target_preset, args.target_params, "target")
        if small_params >= target_params:  # swapped: the savings came out as n/a and -456.8%
            raise ConfigError(f"the small model ({args.small}: {small_params:.4g} parameters) is not smaller than the "
                              f"target ({args.target}: {target_params:.4g}): give the small model's curve first, "
                              f"`analyze SMALL.csv TARGET.csv --op OP`.")
        results = [analyze_pair(small, target, args.op, small_params, target_params,
                                args.batch_tokens, args.window, args.smooth_x, args.rule)]
    print(format_pairs(results))
    if args.json:
        _write_json(args.json, [r.to_dict() for r in results])
    return 0


def cmd_compare_curves(args) -> int:
    from .compare import compare_planner_with_curves, default_logs_dir, format_comparison

    logs = args.logs or default_logs_dir()
    if logs is None:
        raise ConfigError("no --logs given and the repository's tests/data/staged_training_logs is not here: "
                          "pass --logs DIR (the six <preset>.csv curves).")
    if args.json:
        _check_out_file("--json", args.json, "compare.json")
    comparison = compare_planner_with_curves(logs, min_step=args.min_step, batch_tokens=args.batch_tokens)
    print(format_comparison(comparison))
    if args.json:
        _write_json(args.json, comparison.to_dict())
    return 0


def _target_from_args(args):
    shape = (args.n_layer, args.n_embd, args.n_head)
    if any(v is not None for v in shape):
        if any(v is None for v in shape):
            raise ConfigError("give all of --n_layer, --n_embd, --n_head (or --target PRESET).")
        return GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head)
    preset_config(args.target)  # validates the name
    return args.target


def _check_plan_outputs(args) -> None:
    if args.out and args.plot and os.path.abspath(args.out) == os.path.abspath(args.plot):
        raise ConfigError(f"--out and --plot both name {args.out}: the plot would overwrite the plan. Give them "
                          f"different files, e.g. --out plan.json --plot plan.png.")
    if args.out:
        _check_out_file("--out", args.out, "plan.json")
    if args.plot:
        _check_out_file("--plot", args.plot, "plan.png")
        ext = os.path.splitext(args.plot)[1].lstrip(".").lower()
        formats = plot_formats()
        if ext and ext not in formats:
            raise ConfigError(f"--plot {args.plot}: matplotlib cannot write .{ext} files. End the name with one of "
                              f"{', '.join('.' + f for f in formats)} (e.g. .png).")


def cmd_plan(args) -> int:
    _check_plan_outputs(args)
    plan = plan_for_run(_target_from_args(args), args.ops, args.train_steps, batch_tokens=args.batch_tokens,
                        depth_op=args.depth_op, restart_warmup_frac=args.restart_warmup_frac)
    print(plan.table())
    if args.out:
        _make_parent(args.out)
        plan.to_json(args.out)
        print(f"wrote {args.out}")
    if args.plot:
        _make_parent(args.plot)
        plot_plan(plan, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_law(args) -> int:
    if args.n_params is not None:
        n_params = args.n_params
    else:
        n_params = _target_from_args(args)
        n_params = (n_params if isinstance(n_params, GPTConfig) else preset_config(n_params)).n_params_non_embedding
    steps = args.steps if args.steps is not None else optimality_step(n_params)
    s = law_summary(n_params, steps, args.batch_tokens)
    print(f"N = {s['n_params']:.4g} non-embedding params, S = {s['steps']:.0f} steps, B = {s['batch_tokens']} tokens")
    print(f"L(N, S)      = {s['loss']:.4f} nats/token (asymptote (Nc/N)^aN = {s['asymptote']:.4f})")
    print(f"Bcrit(L)     = {s['critical_batch_tokens']:.4g} tokens")
    print(f"C = 6NBS     = {s['compute_flops']:.4g} FLOPs ({s['compute_flops'] / 8.64e19:.4g} PF-days)")
    print(f"dlogL/dlogC  = {s['slope']:.4f}")
    print(f"optimality   : S = {s['optimality_step']:.0f} steps, L = {s['optimality_loss']:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m staged_fast.schedule", description=__doc__,
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", formatter_class=HelpFormatter,
                       help="slope rule on a small and a target validation-loss curve (CSV)",
                       description="Growth step, restart step, constant_op, optimality and compute saving "
                                   "from real curves (TensorBoard CSV exports with Step and Value columns).")
    a.add_argument("small", nargs="?", help="CSV of the small model's validation loss")
    a.add_argument("target", nargs="?", help="CSV of the target model's validation loss")
    a.add_argument("--op", choices=["width", "depth", "depth+width", *DEPTH_OPS],
                   help="growth operator between them (selects the slope threshold)")
    a.add_argument("--logs", help="directory with the authors' six <preset>.csv curves: analyze all four pairs")
    a.add_argument("--small_preset", help="preset of the small model (default: the CSV's file name)")
    a.add_argument("--target_preset", help="preset of the target model (default: the CSV's file name)")
    a.add_argument("--small_params", type=positive_int, help="non-embedding parameter count of the small model")
    a.add_argument("--target_params", type=positive_int, help="non-embedding parameter count of the target model")
    a.add_argument("--batch_tokens", type=positive_int, default=DEFAULT_BATCH_TOKENS,
                   help="tokens per optimizer step")
    a.add_argument("--window", type=positive_int, default=SMOOTH_WINDOW,
                   help="running-mean window (points, 1 or more; at most the curve's points)")
    a.add_argument("--smooth_x", action="store_true",
                   help="also smooth log10(C) with the same window (fixes the gap artefact; not the authors' rule)")
    a.add_argument("--rule", choices=RULES, default="online",
                   help="online: trailing window, the rule the trainer applies live (default); authors: the "
                        "authors' offline analysis (centred window, unsmoothed losses, nearest-loss R)")
    a.add_argument("--json", help="write the results to this JSON file")
    a.set_defaults(func=cmd_analyze)

    c = sub.add_parser("compare-curves", formatter_class=HelpFormatter,
                       help="the planner's predicted saving against the authors' curves",
                       description="Fit the scaling law's constants to the six curves, plan each pair under "
                                   "Kaplan's and the fitted constants, and set both beside the savings "
                                   "measured on the curves (docs/schedule.md).")
    c.add_argument("--logs", help="directory with the six <preset>.csv curves "
                                  "(default: the repository's tests/data/staged_training_logs)")
    c.add_argument("--min_step", type=non_negative_float, default=3000,
                   help="fit the law to points at or after this step (default 3000: after the runs' LR warmup)")
    c.add_argument("--batch_tokens", type=positive_int, default=DEFAULT_BATCH_TOKENS,
                   help="tokens per optimizer step")
    c.add_argument("--json", help="write the comparison to this JSON file")
    c.set_defaults(func=cmd_compare_curves)

    def add_model_args(q):
        q.add_argument("--target", default="GPT2_large", help=f"target preset: {', '.join(PRESET_NAMES)}")
        q.add_argument("--n_layer", type=positive_int, help="explicit target shape (with --n_embd, --n_head)")
        q.add_argument("--n_embd", type=positive_int)
        q.add_argument("--n_head", type=positive_int)
        q.add_argument("--batch_tokens", type=positive_int, default=DEFAULT_BATCH_TOKENS,
                       help="tokens per optimizer step")

    q = sub.add_parser("plan", formatter_class=HelpFormatter,
                       help="plan the stages of a staged run under the scaling law",
                       description="Minimize compute to reach the target's loss at its optimality point.")
    add_model_args(q)
    q.add_argument("--ops", nargs="+", default=["width"],
                   help=f"growths in order: width, depth, or a depth op ({', '.join(DEPTH_OPS)})")
    q.add_argument("--depth_op", default=DEFAULT_DEPTH_OP, choices=DEPTH_OPS, help="trainer op used for 'depth'")
    q.add_argument("--train_steps", type=positive_int,
                   help="scale the stage lengths so the run takes exactly this many optimizer steps")
    q.add_argument("--restart_warmup_frac", type=fraction, default=DEFAULT_RESTART_WARMUP_FRAC,
                   help="LR re-warmup after a growth, as a fraction in [0, 1] of the next stage's steps (0: none)")
    q.add_argument("--out", help="write the plan JSON here (for `staged_fast.train --schedule`)")
    q.add_argument("--plot", help="write a PNG (or another matplotlib format, by the file's extension) of "
                                  "predicted loss against compute, staged and direct")
    q.set_defaults(func=cmd_plan)

    w = sub.add_parser("law", formatter_class=HelpFormatter,
                       help="print L(N,S), Bcrit and C = 6NBS for a model and a step count")
    add_model_args(w)
    w.add_argument("--n_params", type=positive_float, help="non-embedding parameter count (instead of a preset)")
    w.add_argument("--steps", type=positive_float, help="optimizer steps (default: the law's optimality point)")
    w.set_defaults(func=cmd_law)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(quiet_on_closed_pipe(main))
