"""Grow a checkpoint offline (the seed's workflow): python -m staged_fast.grow CKPT --op width --out NEW

    python -m staged_fast.grow runs/small/step_00001000 --op width --out runs/grown
    python -m staged_fast.grow runs/small --op depth --depth_mode alternate_id --out runs/deep
    python -m staged_fast.grow runs/small --op width --width_noise 1e-3 --seed 1 --target GPT2_large --out runs/big

Writes a checkpoint NEW/step_<8-digit update> (same step, trainer state carried over, the grown model and
AdamW state) that `python -m staged_fast.train --resume NEW` continues from; --restart_steps and
--restart_warmup_steps are applied by train on resume. Without optimizer state in CKPT the weights grow
alone (it says so). The step counter of the Adam state can be overridden with --optimizer_step.
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from .checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import PRESETS, preset_config
from .growth import STATE_ABSENT, GrowthError, grow_checkpoint
from .growth.index_maps import DEPTH_MODES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m staged_fast.grow", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a step_<8-digit update> folder written by staged_fast.train, or its run folder (newest)")
    p.add_argument("--op", choices=("width", "depth"), required=True, help="double the width or the depth")
    p.add_argument("--depth_mode", choices=DEPTH_MODES, default="alternate_id",
                   help="depth growth: where the inserted layers go (alternate/append) and what they hold "
                        "(_id: exact identity, loss-preserving; _copy: the seed's copy, changes the loss)")
    p.add_argument("--width_noise", type=float, default=0.0,
                   help="std of E in the [W - E, E] split of every block row (function-preserving; breaks "
                        "the symmetry of the two halves, which otherwise never separate without dropout)")
    p.add_argument("--seed", type=int, default=0, help="seed of the width-noise generator")
    p.add_argument("--target", choices=sorted(PRESETS), default=None,
                   help="the preset the grown model must be (checked; an error if the op does not produce it)")
    p.add_argument("--optimizer_step", type=int, default=None, help="set every parameter's Adam step to this")
    p.add_argument("--backend", choices=("auto", "fused", "reference"), default="auto",
                   help="fused C++ kernels (auto: when built) or the PyTorch reference")
    p.add_argument("--out", required=True, help="run folder to write the grown checkpoint into")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    op = "width" if args.op == "width" else args.depth_mode
    path = resolve_checkpoint(args.checkpoint)
    ckpt = load_checkpoint(path)
    step, trainer_state, old_shape = ckpt.step, dict(ckpt.trainer_state), ckpt.config.shape_str()
    state_absent = ckpt.optimizer_state is None
    target = None if args.target is None else preset_config(args.target)
    generator = torch.Generator().manual_seed(args.seed)
    try:
        config, model, optimizer = grow_checkpoint(
            ckpt, op, width_noise=args.width_noise, generator=generator, optimizer_step=args.optimizer_step,
            target=target, backend=args.backend,
        )
    except GrowthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer_state["grown_from"] = {"checkpoint": str(path), "op": op, "shape": old_shape,
                                   "width_noise": args.width_noise, "seed": args.seed}
    out = save_checkpoint(args.out, step=step, model=model, config=config, optimizer=optimizer,
                          trainer_state=trainer_state)
    note = f" ({STATE_ABSENT})" if state_absent else ""
    print(f"grew {old_shape} -> {config.shape_str()} by {op}{note}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
