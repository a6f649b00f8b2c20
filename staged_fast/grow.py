"""Grow a checkpoint offline (the seed's workflow): python -m staged_fast.grow CKPT --op width --out NEW

    python -m staged_fast.grow runs/small/step_00001000 --op width --out runs/grown
    python -m staged_fast.grow runs/small --op depth --depth_mode alternate_id --out runs/deep
    python -m staged_fast.grow runs/small --op width --width_noise 1e-3 --seed 1 --target GPT2_large --out runs/big

Writes a checkpoint NEW/step_<8-digit update> (same step, trainer state carried over, the grown model and
AdamW state) that `python -m staged_fast.train --resume NEW` continues from; --restart_steps and
--restart_warmup_steps are applied by train on resume. Without optimizer state in CKPT the weights grow
alone (it says so). The step counter of the Adam state can be overridden with --optimizer_step.
NEW must be empty or new (--overwrite replaces the checkpoints and logs in it); it is locked while written.
Bad input (a missing or damaged checkpoint, an --out that is a file or holds a run) exits with code 2.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .cli_help import HelpFormatter, quiet_on_closed_pipe
from .cli_types import non_negative_float, non_negative_int
from .config import LLAMA_PRESETS, PRESETS, ConfigError, preset_config
from .growth import STATE_ABSENT, GrowthError, grow_checkpoint
from .growth.index_maps import DEPTH_MODES
from .run_folder import LOCK_NAME, RunFolderError, RunLock, remove_leftovers

# What a run folder of ours holds; --overwrite removes these (and nothing else) from --out.
_RUN_ENTRIES = ("metrics.jsonl", "run.json", "tensorboard")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m staged_fast.grow", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="a step_<8-digit update> folder written by staged_fast.train, or its run folder (newest)")
    p.add_argument("--op", choices=("width", "depth"), required=True, help="double the width or the depth")
    p.add_argument("--depth_mode", choices=DEPTH_MODES, default="alternate_id",
                   help="depth growth: where the inserted layers go (alternate/append) and what they hold "
                        "(_id: exact identity, loss-preserving; _copy: the seed's copy, changes the loss)")
    p.add_argument("--width_noise", type=non_negative_float, default=0.0,
                   help="std of E in the [W - E, E] split of every block row (function-preserving in exact "
                        "arithmetic; in floating point only while E is small beside the weights: 0.01 or less for "
                        "GPT-2-scale std 0.02, 0.1 moved a loss by 0.04; breaks the symmetry of the two halves, "
                        "which otherwise never separate without dropout)")
    p.add_argument("--seed", type=int, default=0, help="seed of the width-noise generator")
    p.add_argument("--target", choices=sorted(PRESETS) + sorted(LLAMA_PRESETS), default=None,
                   help="the preset the grown model must be (checked; an error if the op does not produce it)")
    p.add_argument("--optimizer_step", type=non_negative_int, default=None,
                   help="set every parameter's Adam step to this (0 or more)")
    p.add_argument("--backend", choices=("auto", "fused", "reference"), default="auto",
                   help="fused C++ kernels (auto: when built) or the PyTorch reference")
    p.add_argument("--out", required=True, help="run folder to write the grown checkpoint into (empty or new)")
    p.add_argument("--overwrite", action="store_true",
                   help="--out may hold another run: its checkpoints and logs are replaced")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


class _Refused(ValueError):
    pass


def _check_out(out: Path, source: Path, overwrite: bool) -> None:
    """--out must be a folder that is new or empty (or, with --overwrite, may be replaced)."""
    if out.exists() and not out.is_dir():
        raise _Refused(f"--out {out} is a file; it must be a folder (the grown checkpoint is written into it as "
                       f"step_<8-digit update>/). Choose another --out.")
    out_r, src_r = out.resolve(), source.resolve()
    if out_r in (src_r, src_r.parent) or src_r.is_relative_to(out_r):
        raise _Refused(f"--out {out} holds the checkpoint being grown ({source}); write the grown checkpoint to a "
                       f"new folder, e.g. --out {source.parent}_grown.")
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise _Refused(f"--out {out} is not empty (it holds {shown}): writing there would mix the grown checkpoint "
                       f"with another run's files. Choose a new or empty folder, or pass --overwrite to replace the "
                       f"checkpoints and logs in it.")


def _clear_run(out: Path) -> None:
    """--overwrite: remove the checkpoints, logs and leftovers of the run in `out` (other files stay)."""
    remove_leftovers(out)
    for p in list_checkpoints(out):
        shutil.rmtree(p)
    for name in _RUN_ENTRIES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        return _grow(args)
    except (CheckpointError, ConfigError, GrowthError, RunFolderError, _Refused) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _grow(args) -> int:
    op = "width" if args.op == "width" else args.depth_mode
    out_dir = Path(args.out)
    path = resolve_checkpoint(args.checkpoint)
    _check_out(out_dir, path, args.overwrite)  # before the work: nothing is written on bad input
    ckpt = load_checkpoint(path)
    step, trainer_state, old_shape = ckpt.step, dict(ckpt.trainer_state), ckpt.config.shape_str()
    state_absent = ckpt.optimizer_state is None
    target = None if args.target is None else preset_config(args.target)
    generator = torch.Generator().manual_seed(args.seed)
    config, model, optimizer = grow_checkpoint(
        ckpt, op, width_noise=args.width_noise, generator=generator, optimizer_step=args.optimizer_step,
        target=target, backend=args.backend,
    )
    trainer_state.pop("metrics_lines", None)  # of the source run's log: --out starts its own metrics.jsonl
    trainer_state["grown_from"] = {"checkpoint": str(path), "op": op, "shape": old_shape,
                                   "width_noise": args.width_noise, "seed": args.seed}
    # the growth log tells a later `train --resume` with the small model's flags that it grew (as in-run growth)
    trainer_state["growth_log"] = [*trainer_state.get("growth_log", []), dict(
        event="growth", op=op, iteration=trainer_state.get("iteration", step), old_size=old_shape,
        new_size=config.shape_str(), offline=True)]
    with RunLock(out_dir, flag="--out"):  # one writer per run folder, as train
        _check_out(out_dir, path, args.overwrite)  # again, now that no one else can write there
        if args.overwrite:
            _clear_run(out_dir)
        out = save_checkpoint(out_dir, step=step, model=model, config=config, optimizer=optimizer,
                              trainer_state=trainer_state)
    note = f" ({STATE_ABSENT})" if state_absent else ""
    print(f"grew {old_shape} -> {config.shape_str()} by {op}{note}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(quiet_on_closed_pipe(main))
