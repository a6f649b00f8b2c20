"""Command line of `python -m staged_fast.train`: every flag, its help, and validation in one place.

The seed's flags (gpt_pretrain.py) parse unchanged; ours extend them.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .activation_checkpointing import POLICIES as AC_POLICIES
from .cli_help import HelpFormatter
from .cli_types import finite_float, non_negative_float, positive_float, unit_interval
from .config import LLAMA_PRESETS, PRESETS, ConfigError, GPTConfig, initial_lr_for, preset_config
from .data.flags import (absolute_data_paths, absolute_local, add_data_flags, cache_dir_problem, looks_like_path,
                         tokenizer_path_problem)
from .kernels import BACKENDS, check_dq_mode
from .lr_schedule import DECAYS

GROWTH_OP_NAMES = ("width", "alternate_id", "append_id", "alternate_copy", "append_copy")

# What `python -m staged_fast.train` with no arguments runs: a tiny model on the bundled corpus that
# doubles its width halfway, a few minutes on 2 CPU cores.
DEMO_ARGV = [
    "--size", "tiny_div2_width", "--train_steps", "240", "--warmup_steps", "24",
    "--batch_size", "8", "--seqlen", "64", "--val_every", "40", "--val_batches", "4",
    "--log_rate", "10", "--grow_at", "120", "--grow_ops", "width", "--restart_steps", "auto",
    "--restart_warmup_steps", "10",
]
# `python -m staged_fast.train --arch llama` (no other flags): the same demo for the llama family.
LLAMA_DEMO_ARGV = ["--arch", "llama", "--size", "llama_tiny_div2_width"] + DEMO_ARGV[2:]


def demo_argv(argv: list[str]) -> list[str] | None:
    """The demo command line when `argv` is empty or only names the architecture, else None."""
    if not argv:
        return list(DEMO_ARGV)
    if argv in (["--arch", "gpt2"], ["--arch=gpt2"]):
        return list(DEMO_ARGV)
    if argv in (["--arch", "llama"], ["--arch=llama"]):
        return list(LLAMA_DEMO_ARGV)
    return None


class UsageError(ValueError):
    """Flags that contradict each other or the data; the message says which and how to fix it."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m staged_fast.train",
        description="Pre-train a GPT-2-style model, optionally growing it (staged training). "
        "With no arguments: a short staged demo run on the bundled corpus.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("run")
    g.add_argument("--save_prefix", default=None, help="run folder for checkpoints and logs (default: the --resume "
                   "run's own folder when --resume names its newest checkpoint, else runs/<size>-<time>)")
    g.add_argument("--resume", default=None, help="checkpoint folder, run folder, or 'latest' (in --save_prefix) to "
                   "continue; continuing a checkpoint of --save_prefix's own run, the training flags this command "
                   "leaves out are the checkpoint's (data, batch, schedule, precision, growth plan; a note says "
                   "which)")
    g.add_argument("--seed", type=int, default=1234, help="seeds init, data order and dropout")
    g.add_argument("--deterministic", action="store_true", help="the same bits on every run of this command on the "
                   "same machine: torch.use_deterministic_algorithms(True) (an op with no deterministic kernel is an "
                   "error), CUBLAS_WORKSPACE_CONFIG=:4096:8, and the flash attention backward's split dQ (no atomics; "
                   "slower, benchmarks/bench_kernels.py --only attention_dq)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda if available")
    g.add_argument("--gpu_count", type=int, default=None, help="seed flag: processes to launch (-1 = all GPUs); "
                   "without torchrun, >1 re-launches itself with torch.distributed.run")
    g.add_argument("--stop_at_step", type=int, default=None,
                   help="save and exit after this update (the run's updates, which a growth with --restart_steps "
                   "does not move back, unlike the step counter); resume later")
    g.add_argument("--overwrite", action="store_true", help="allow a --save_prefix that already holds another run")
    g.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp"), help="data parallelism under torchrun: "
                   "ddp (a full copy of weights and AdamW state per process) or fsdp (FSDP2 fully_shard per block "
                   "and at the root: weights, grads and AdamW state sharded; sharded checkpoints that resume on any "
                   "number of processes)")

    g = p.add_argument_group("model")
    g.add_argument("--arch", default=None, choices=("gpt2", "llama"), help="model family (default gpt2; a llama_* "
                   "--size implies llama). llama: RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases")
    g.add_argument("--size", default=None, help=f"preset: {', '.join(PRESETS)}, {', '.join(LLAMA_PRESETS)}")
    g.add_argument("--n_layer", type=int, default=None)
    g.add_argument("--n_embd", type=int, default=None)
    g.add_argument("--n_head", type=int, default=None)
    g.add_argument("--n_positions", type=int, default=1024, help="position-table length (max --seqlen; llama: max context)")
    g.add_argument("--n_kv_head", type=int, default=None, help="llama: key/value heads for grouped-query attention "
                   "(default: the preset's, else n_head)")
    g.add_argument("--intermediate_size", type=int, default=None, help="llama: SwiGLU hidden size (default: the "
                   "preset's, else the multiple of 64 nearest 8/3 n_embd)")
    g.add_argument("--rope_theta", type=positive_float, default=10000.0, help="llama: RoPE base")
    g.add_argument("--tie_embeddings", default=None, choices=("true", "false"), help="llama: tie the LM head to "
                   "the token embedding (default true; GPT-2 always ties)")
    g.add_argument("--dropout", type=finite_float, default=0.1, help="embedding/residual dropout (seed: 0.1)")
    g.add_argument("--attn_dropout", type=finite_float, default=None, help="attention-probability dropout (default: --dropout)")
    g.add_argument("--model", default="gpt2", help="seed flag: model family 'gpt2' (with --random), or a HF "
                   "GPT-2 folder/hub name whose weights initialize the run (without --random)")
    g.add_argument("--random", action="store_true", help="seed flag: random init (our default unless --model is a "
                   "weights folder)")
    g.add_argument("--kernels", default="auto", choices=BACKENDS, help="attention/layernorm/loss implementation")
    g.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the training model (default backend inductor; e.g. aot_eager to check "
                   "graphs cheaply). The fused kernels are single custom ops, so the model's graph has no breaks "
                   "(--parallel fsdp: FSDP2's hooks split it at each sharded block); it is compiled again once "
                   "after each growth (new static shapes). Evaluation runs uncompiled")
    g.add_argument("--activation_checkpointing", nargs="?", type=int, const=1, default=0, metavar="EVERY",
                   help="keep only the input of every EVERY-th block (default every block) in the forward and "
                   "recompute its activations in the backward (same dropout masks, same gradients): activation memory "
                   "falls towards one block's plus the inputs, for up to one more forward pass of compute per step "
                   "(+15.5%% per step on CPU with every block, benchmarks/RESULTS.md); EVERY=2 checkpoints half")
    g.add_argument("--ac_policy", choices=AC_POLICIES, default="full",
                   help="what a checkpointed block keeps besides its input: full (nothing; its whole forward runs again) "
                   "or matmuls (torchtitan's op-level selective checkpointing: the outputs of its matmuls and its "
                   "attention are kept, and only norms, activations, dropout and casts run again: less recompute, "
                   "more memory). Needs --activation_checkpointing")

    g = p.add_argument_group("data")
    add_data_flags(g)
    g.add_argument("--seqlen", type=int, default=1024, help="tokens per sample")
    g.add_argument("--batch_size", type=int, default=8, help="samples per micro-batch per process")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")

    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=finite_float, default=None, help="peak LR (default: the seed's heuristic "
                   "0.003239 - 0.0001395*log10(12*n_layer*d^2))")
    g.add_argument("--warmup_steps", type=int, default=3000)
    g.add_argument("--train_steps", type=int, default=250000, help="LR reaches its minimum here; training stops")
    g.add_argument("--lr_decay", default="linear", choices=DECAYS, help="after warmup: linear or cosine to --min_lr "
                   "at --train_steps, or wsd: the peak held, then linear to --min_lr over the last --decay_fraction")
    g.add_argument("--decay_fraction", type=finite_float, default=0.2, help="--lr_decay wsd: share of --train_steps spent "
                   "decaying")
    g.add_argument("--min_lr", type=non_negative_float, default=0.0)
    g.add_argument("--adam_beta1", type=unit_interval, default=0.9)
    g.add_argument("--adam_beta2", type=unit_interval, default=0.98)
    g.add_argument("--adam_eps", type=positive_float, default=1e-6)
    g.add_argument("--weight_decay", type=non_negative_float, default=0.0, help="AdamW's decoupled decay, on weight matrices "
                   "and embeddings only (biases and norm gains are not decayed)")
    g.add_argument("--grad_clip", type=non_negative_float, default=1.0, help="max global grad norm (0 = off)")
    g.add_argument("--fp16", action="store_true", help="fp16 autocast with a GradScaler")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast")
    g.add_argument("--tf32", action="store_true", help="CUDA: fp32 matmuls (and the flash attention kernel's fp32 "
                   "dots) on TF32 tensor cores (10-bit mantissa products; an H100's datasheet peak is ~7x exact "
                   "fp32's, not measured here) via torch.set_float32_matmul_precision('high'); what bf16/fp16 "
                   "autocast runs is unchanged")

    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--val_every", type=int, default=500)
    g.add_argument("--val_batches", type=int, default=50, help="micro-batches per process per validation")
    g.add_argument("--log_rate", type=int, default=10, help="steps between log records")
    g.add_argument("--save_every", type=int, default=1000)
    g.add_argument("--keep_last", type=int, default=3, help="checkpoints kept (0 = all)")
    g.add_argument("--tensorboard", action="store_true")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    g.add_argument("--profile", default=None, metavar="START[:COUNT]", help="torch.profiler over updates START.. "
                   "START+COUNT-1 (COUNT default 3; one warm-up update before): a Chrome trace per rank in "
                   "<save_prefix>/profile/ and a table of the costliest ops from rank 0")

    g = p.add_argument_group("growth (staged training)")
    g.add_argument("--doubling", choices=("weights", "layers"), default=None, help="seed flag: grow the --resume "
                   "checkpoint (weights = width, layers = depth), save it, and continue training")
    g.add_argument("--doubling_layers", default="alternate_id", choices=GROWTH_OP_NAMES[1:],
                   help="depth operator for --doubling layers (the seed's was alternate_copy, not loss-preserving)")
    g.add_argument("--width_noise", type=finite_float, default=0.0, help="std of the symmetry-breaking split for width growth (exact in floating point only while "
                   "small beside the weights: 0.01 or less for GPT-2-scale std 0.02; the run warns when a growth "
                   "moves the loss)")
    g.add_argument("--restart_steps", default=None, help="step counter after growth: an int, or 'auto' = "
                   "growth step / constant_op of the operator")
    g.add_argument("--restart_warmup_steps", type=int, default=0, help="LR ramps from 0 at the restart step to "
                   "the schedule's value this many steps later")
    g.add_argument("--reset_lr_scheduler", action="store_true", help="on --resume, rebuild the LR schedule from "
                   "the flags instead of the checkpoint's")
    g.add_argument("--reset_data_order", action="store_true", help="on --resume, start a new data order (other "
                   "--data, --seed or --seqlen) instead of going on where the checkpoint's stopped; the model may "
                   "see again what it has seen")
    g.add_argument("--grow_at", default=None, help="comma-separated steps at which to grow in memory")
    g.add_argument("--grow_ops", default="width", help=f"comma-separated operators, one per growth: {', '.join(GROWTH_OP_NAMES)}")
    g.add_argument("--schedule", default=None, help="plan JSON from `python -m staged_fast.schedule plan`")
    g.add_argument("--grow_when", default=None, choices=("slope",), help="grow when the validation curve's "
                   "slope rule fires (operators from --grow_ops)")
    return p


# What a continued run (--resume of a checkpoint in its own --save_prefix folder) takes from that checkpoint when
# the command leaves the flag out: what it trains on and how. So `--resume latest --save_prefix DIR` alone goes on
# as the run was started; a flag left out used to take its default (the bundled corpus, batch 8, and 250000
# updates, those past the run's own --train_steps at the LR its schedule ends with). The model's shape is the
# checkpoint's own; how the run launches (device, ranks, kernels, compile, checkpointing, workers, progress)
# and one-off actions (--stop_at_step, --profile, --doubling, --overwrite) come from each command.
KEPT_ON_CONTINUE = (
    "seed", "n_positions", "dropout", "attn_dropout",
    "data", "tokenizer", "text_field", "val_fraction", "val_data", "cache_dir",
    "seqlen", "batch_size", "grad_accum", "lr", "warmup_steps", "train_steps", "lr_decay", "decay_fraction", "min_lr",
    "adam_beta1", "adam_beta2", "adam_eps", "weight_decay", "grad_clip", "fp16", "bf16", "tf32",
    "val_every", "val_batches", "log_rate", "save_every", "keep_last", "tensorboard",
    "width_noise", "restart_steps", "restart_warmup_steps", "grow_at", "grow_ops", "schedule", "grow_when",
    "doubling_layers",
)
# What the checkpoint's data order (its sampler's position) was drawn from. A new run from another run's
# checkpoint (a branch, or --doubling) takes the ones its command leaves out as well, so that it goes on with
# the data it has not seen yet: the command's defaults (the bundled corpus, seed 1234) were refused by the
# sampler. --reset_data_order starts a new order instead.
DATA_ORDER_FLAGS = ("data", "tokenizer", "text_field", "val_fraction", "val_data", "cache_dir", "seed", "seqlen")
# Flags that go together: one of them given, the others are not taken from the checkpoint either.
_TOGETHER = (("fp16", "bf16"), ("grow_at", "grow_ops", "schedule", "grow_when"))
# What the LR schedule was built from. A continued run keeps the checkpoint's schedule, so a changed value would
# not apply (a longer --train_steps trained on at the schedule's final LR); --reset_lr_scheduler rebuilds it.
SCHEDULE_FLAGS = ("lr", "warmup_steps", "train_steps", "lr_decay", "decay_fraction", "min_lr")


def given_flags(argv: list[str]) -> set[str]:
    """The destinations of the flags this command line gives (parsed as argparse would, abbreviations included)."""
    parser = build_parser()
    for action in parser._actions:  # absent flags then leave no attribute
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _flag_text(name: str, value) -> str:
    if value is True:
        return f"--{name}"
    if value is False or value is None:
        return f"no --{name}"
    return f"--{name} " + (" ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))


def _continued_checkpoint(args) -> Path | None:
    """The checkpoint this --resume continues in its own run folder, else None (no --resume, --doubling, a fresh
    `latest`, another folder's checkpoint). Without --save_prefix, a --resume of its run's newest checkpoint (the
    run folder, or its newest step_ folder) continues that run there: --save_prefix is set to the folder (it used
    to be a new timestamped one, with the command's defaults). An older checkpoint still starts a new folder
    (continued in place, it would overwrite the newer ones), and so does --doubling (the seed's workflow writes
    the grown run elsewhere)."""
    if not args.resume or args.doubling:
        return None
    from .checkpoint import list_checkpoints, resolve_checkpoint

    if args.save_prefix is None:
        if args.resume == "latest":
            return None  # the trainer names the missing --save_prefix
        path = resolve_checkpoint(args.resume)
        found = list_checkpoints(path.parent)
        if not found or found[-1].resolve() != path.resolve():
            return None
        args.save_prefix = str(path.parent)
        return path
    if args.resume == "latest":  # a step a killed re-save moved aside counts: the folder's owner puts it back
        found = list_checkpoints(args.save_prefix, moved_aside=True)
        return found[-1] if found else None  # none: a fresh start
    path = resolve_checkpoint(args.resume, args.save_prefix)
    return path if path.resolve().parent == Path(args.save_prefix).resolve() else None


def _branched_checkpoint(args) -> Path | None:
    """The checkpoint a new run starts from (--resume of another folder's checkpoint, or --doubling), else None."""
    if not args.resume:
        return None
    from .checkpoint import list_checkpoints, resolve_checkpoint

    if args.resume == "latest":
        if args.save_prefix is None or not list_checkpoints(args.save_prefix):
            return None  # a fresh start, or the trainer names the missing --save_prefix
    return resolve_checkpoint(args.resume, args.save_prefix)


def _take(args, saved: dict, names, skip: set[str]) -> list[str]:
    taken = []
    for name in names:
        if name in skip or name not in saved or getattr(args, name) == saved[name]:
            continue
        setattr(args, name, saved[name])
        taken.append(_flag_text(name, saved[name]))
    return taken


def continue_with_saved_flags(args, given: set[str]) -> tuple[list[str], Path | None]:
    """Fill the flags a continued run's command leaves out from its checkpoint (KEPT_ON_CONTINUE); refuse a
    changed schedule flag without --reset_lr_scheduler. A new run from another run's checkpoint is defined by its
    command, but for the data order's flags it leaves out (DATA_ORDER_FLAGS). Returns the flags taken, as text,
    and the checkpoint they came from when that is a branch (None when the run continues)."""
    from .checkpoint import read_trainer_state

    path = _continued_checkpoint(args)
    if path is None:
        branched = _branched_checkpoint(args)
        if branched is None:
            return [], None
        if args.doubling and args.save_prefix and branched.resolve().parent == Path(args.save_prefix).resolve():
            # the README's requeue of a doubled run (the same command with --resume latest) grew it a second time
            raise UsageError(f"--doubling would grow {branched}, a checkpoint of this run ({args.save_prefix}) "
                             f"itself: a doubled run requeued with --resume latest grew again. To continue it, drop "
                             f"--doubling; to grow a run, give its checkpoint with --resume and another --save_prefix.")
        saved = read_trainer_state(branched).get("args") or {}
        return _take(args, saved, DATA_ORDER_FLAGS, given), branched
    state = read_trainer_state(path)
    saved = state.get("args") or {}
    changed = [n for n in SCHEDULE_FLAGS if n in given and n in saved and getattr(args, n) != saved[n]]
    if changed and not args.reset_lr_scheduler:
        was = ", ".join(_flag_text(n, saved[n]) for n in changed)
        now = ", ".join(_flag_text(n, getattr(args, n)) for n in changed)
        raise UsageError(
            f"{path}'s LR schedule was built from {was}; this command asks for {now}, which a continued run would "
            f"not apply (it keeps the checkpoint's schedule). Add --reset_lr_scheduler to rebuild the schedule "
            f"from this command's flags from step {state.get('step', '?')} on, or leave "
            f"{', '.join('--' + n for n in changed)} out to finish the run as it was planned.")
    held = {n for group in _TOGETHER if given.intersection(group) for n in group}
    return _take(args, saved, KEPT_ON_CONTINUE, given | held), None


def parse_args(argv: list[str] | None):
    import sys

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    given = given_flags(argv)
    planned = sorted(given & {"restart_steps", "restart_warmup_steps", "grow_ops"}) if "schedule" in given else []
    if planned:  # the plan's growths carry their own op, restart step and warmup: these would do nothing
        raise UsageError(f"{', '.join('--' + n for n in planned)} with --schedule: the plan sets each growth's "
                         f"operator, restart step and warmup. Drop {'them' if len(planned) > 1 else 'it'}, or make a "
                         f"plan with other ones (`python -m staged_fast.schedule plan --help`).")
    # a resume restarts the step counter only for a --restart_steps typed on its command, not one a continued run
    # takes from its checkpoint (that one is for the run's own growths; the first resume of a grown run had it)
    args.restart_given = "restart_steps" in given
    _plan_updates_as_length(args, given)
    taken, branched = continue_with_saved_flags(args, given)
    _check_plan_length(args, given)
    if taken and branched is None:
        _note(f"continuing the run in {args.save_prefix} with its checkpoint's flags where this command leaves "
              f"them out: {'; '.join(taken)}")
    elif taken:
        _note(f"starting from {branched} with its data order's flags where this command leaves them out, so that "
              f"it goes on with the data the checkpoint has not seen: {'; '.join(taken)}")
    validate(args)
    _absolute_local_paths(args)
    return args


def _warn_unused(args) -> None:
    """Flags that do nothing in this run: said once, so that a typo or a misunderstanding shows."""
    growth = args.grow_at or args.schedule or args.grow_when or args.doubling or args.resume
    if args.restart_warmup_steps and not growth:
        _warn(f"--restart_warmup_steps {args.restart_warmup_steps} ramps the LR after a growth, and this run has "
              f"none (no --grow_at, --schedule, --grow_when or --doubling): it does nothing.")
    ops = growth_ops(args) if (args.grow_at or args.grow_when) else []
    if args.width_noise and (args.grow_at or args.grow_when) and "width" not in ops:
        _warn(f"--width_noise {args.width_noise} splits width growths, and this run's growths are {', '.join(ops)}: "
              f"it does nothing.")
    if args.profile and args.restart_steps is None and not args.resume:
        from .profiling import parse_window

        start, _ = parse_window(args.profile)
        if start > args.train_steps:
            _warn(f"--profile {args.profile} starts at update {start}, and the run ends at update {args.train_steps} "
                  f"(--train_steps): nothing will be profiled.")
    if args.decay_fraction != 0.2 and args.lr_decay != "wsd":
        _warn(f"--decay_fraction {args.decay_fraction} is the share of the run --lr_decay wsd decays over; with "
              f"--lr_decay {args.lr_decay} it does nothing.")


def _absolute_local_paths(args) -> None:
    """Local paths as absolute ones: the checkpoint records the flags, and a continued run takes them, so a
    relative --data or --tokenizer requeued from another working directory read another folder of that name, or
    was taken for a hub name (after ~30 s of retries offline). Hub names stay as given."""
    absolute_data_paths(args)
    for name in ("schedule", "model"):
        if getattr(args, name):
            setattr(args, name, absolute_local(getattr(args, name)))


def model_config(args, *, vocab_size: int) -> GPTConfig:
    """The model's config from --size or explicit dimensions (explicit ones override the preset)."""
    dims = {k: getattr(args, k) for k in ("n_layer", "n_embd", "n_head") if getattr(args, k) is not None}
    common = dict(
        vocab_size=vocab_size,
        n_positions=args.n_positions,
        dropout=args.dropout,
        attn_dropout=args.dropout if args.attn_dropout is None else args.attn_dropout,
    )
    if llama_requested(args):
        return _llama_config(args, dims, common)
    if args.size is not None:
        return preset_config(args.size, **common).replace(**dims)
    if len(dims) == 3:
        return GPTConfig(**dims, **common)
    if dims:
        raise ConfigError("Give all of --n_layer, --n_embd and --n_head, or --size PRESET.")
    return preset_config("GPT2_base", **common)


def llama_requested(args) -> bool:
    """--arch llama, or a llama_* preset; the llama-only flags with --arch gpt2 are refused in validate."""
    arch = getattr(args, "arch", None)
    return arch == "llama" or (arch is None and getattr(args, "size", None) in LLAMA_PRESETS)


def _llama_config(args, dims: dict, common: dict) -> GPTConfig:
    extra = dict(rope_theta=args.rope_theta, tie_embeddings=args.tie_embeddings != "false")
    for k in ("n_kv_head", "intermediate_size"):
        if getattr(args, k) is not None:
            extra[k] = getattr(args, k)
    if args.size is not None:
        if args.size not in LLAMA_PRESETS:
            raise ConfigError(f"--arch llama takes a llama preset ({', '.join(LLAMA_PRESETS)}), got --size {args.size}; "
                              f"or give --n_layer/--n_embd/--n_head (and --n_kv_head) explicitly.")
        base = preset_config(args.size, **common)
        if "n_embd" in dims and "intermediate_size" not in extra:
            extra["intermediate_size"] = 0  # a new width: the default hidden for it
        if "n_head" in dims and "n_kv_head" not in extra:
            extra["n_kv_head"] = 0
        return GPTConfig(**dict(base.to_dict(), **dims, **extra))
    if len(dims) == 3:
        return GPTConfig(arch="llama", **dims, **common, **extra)
    if dims:
        raise ConfigError("Give all of --n_layer, --n_embd and --n_head, or --size PRESET.")
    return preset_config("llama_base", **common).replace(**extra)


def peak_lr(args, config: GPTConfig) -> float:
    """--lr, else the seed's heuristic by non-embedding parameter count (GPT-2: 12 * n_layer * d^2)."""
    return args.lr if args.lr is not None else initial_lr_for(config)


def growth_ops(args) -> list[str]:
    ops = [o.strip() for o in args.grow_ops.split(",") if o.strip()]
    for op in ops:
        if op not in GROWTH_OP_NAMES:
            raise UsageError(f"--grow_ops: unknown operator {op!r}; choose from {', '.join(GROWTH_OP_NAMES)}.")
    return ops


def validate(args) -> None:
    if args.size is not None and args.size not in PRESETS and args.size not in LLAMA_PRESETS:
        preset_config(args.size)  # raises the ConfigError that lists the presets
    if args.arch == "gpt2" and args.size in LLAMA_PRESETS:
        raise UsageError(f"--size {args.size} is a llama preset; drop --arch gpt2 (or pass --arch llama).")
    if not llama_requested(args):
        given = [f"--{k}" for k in ("n_kv_head", "intermediate_size", "tie_embeddings") if getattr(args, k) is not None]
        if args.rope_theta != 10000.0:
            given.append("--rope_theta")
        if given:
            raise UsageError(f"{', '.join(given)} apply to --arch llama only; GPT-2 has multi-head attention, a 4d "
                             f"GELU MLP, learned positions and a tied head. Add --arch llama or drop them.")
    if not args.resume:  # fail before any data work; a resumed run takes its shape from the checkpoint
        model_config(args, vocab_size=50257)
    if args.fp16 and args.bf16:
        raise UsageError("--fp16 and --bf16 are exclusive: pick one.")
    try:  # here, before any work, not at the first backward
        check_dq_mode(os.environ.get("STAGED_FAST_ATTN_DQ", "atomic"))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if getattr(args, "parallel", "ddp") == "fsdp" and args.fp16:
        raise UsageError("--parallel fsdp does not support --fp16 (a GradScaler over sharded gradients); use --bf16 "
                         "(bf16 compute, fp32 gradient reduce) or --parallel ddp.")
    # a fresh run shaped by its flags is checked here; a resumed one against its checkpoint's config, one from
    # --model weights against theirs (the trainer does both: these flags' n_positions may mean nothing for them)
    from .checkpoint import list_checkpoints

    fresh = not args.resume or (args.resume == "latest" and args.save_prefix is not None
                                and not list_checkpoints(args.save_prefix, moved_aside=True))
    shaped_by_flags = fresh and (args.random or args.model in ("gpt2", None))
    if args.seqlen > args.n_positions and shaped_by_flags:
        raise ConfigError(
            f"--seqlen {args.seqlen} exceeds the model's n_positions={args.n_positions}: "
            + ("its RoPE tables are built that long" if llama_requested(args) else "learned positions stop there")
            + ". Lower --seqlen or raise --n_positions."
        )
    for name in ("batch_size", "grad_accum", "train_steps", "val_every", "val_batches", "log_rate", "save_every",
                 "seqlen"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}.")
    if args.doubling and not args.resume:
        raise UsageError("--doubling grows a checkpoint: give it with --resume PATH.")
    if args.gpu_count is not None and args.gpu_count < 1 and args.gpu_count != -1:
        raise UsageError(f"--gpu_count must be 1 or more, or -1 for every GPU; got {args.gpu_count}.")
    if args.lr is not None and 0 < args.lr < args.min_lr:
        raise UsageError(f"--min_lr {args.min_lr} is above the peak --lr {args.lr}: the decay would raise the LR. "
                         f"Give a --min_lr below --lr (0 decays to nothing).")
    sources = [x for x in (args.grow_at, args.schedule, args.grow_when) if x]
    if len(sources) > 1:
        raise UsageError("Use one of --grow_at, --schedule and --grow_when, not several.")
    if args.grow_at:
        try:
            steps = [int(s) for s in args.grow_at.split(",")]
        except ValueError:
            raise UsageError(f"--grow_at takes comma-separated integers, got {args.grow_at!r}.") from None
        if len(steps) != len(growth_ops(args)):
            raise UsageError(f"--grow_at lists {len(steps)} steps but --grow_ops {len(growth_ops(args))} operators; "
                             f"give one operator per growth.")
    growth_ops(args)
    if args.grow_when == "slope" and args.restart_steps is None:
        args.restart_steps = "auto"  # R = growth step / constant_op, as the slope rule assumes
    if args.restart_steps not in (None, "auto"):
        try:
            args.restart_steps = int(args.restart_steps)
        except ValueError:
            raise UsageError(f"--restart_steps takes an integer or 'auto', got {args.restart_steps!r}.") from None
    _check_values(args)
    _warn_unused(args)  # after the checks: it reads values they vouch for
    _check_paths(args)
    _check_growths(args)
    _check_plan(args)
    if args.warmup_steps > args.train_steps and not args.schedule:
        _warn(f"--warmup_steps {args.warmup_steps} is longer than --train_steps {args.train_steps}: the LR rises "
              f"for the whole run and never reaches its peak nor decays. Lower --warmup_steps if that is not meant.")


# Set by the --gpu_count launcher for its workers: it parsed the same flags and said their notes already.
FLAGS_REPORTED_ENV = "STAGED_FAST_FLAGS_REPORTED"


def _reports() -> bool:
    """Whether this process says what parsing found: once per job, on rank 0 (every process of a torchrun job
    parses the same flags), and not again in the workers of a --gpu_count launcher that said it."""
    return os.environ.get("RANK", "0") == "0" and not ("RANK" in os.environ and FLAGS_REPORTED_ENV in os.environ)


def _warn(message: str) -> None:
    import sys

    if _reports():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _note(message: str) -> None:
    """On stdout with the run's other notes."""
    if _reports():
        print(f"note: {message}", flush=True)


def _check_values(args) -> None:
    """Numbers that have no meaning out of range (each used to give a traceback or be accepted silently)."""
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}. It is the peak learning rate; leave it out to use "
                         f"the seed's heuristic 0.003239 - 0.0001395*log10(12*n_layer*d^2).")
    if args.warmup_steps < 0:
        raise UsageError(f"--warmup_steps must be 0 or more, got {args.warmup_steps}: it is the number of updates "
                         f"over which the LR rises linearly to its peak (0: no warmup).")
    if args.stop_at_step is not None and args.stop_at_step < 1:
        raise UsageError(f"--stop_at_step must be 1 or more, got {args.stop_at_step}: it is the update after which "
                         f"the run saves a checkpoint and exits. Leave it out to train to --train_steps.")
    if args.profile is not None:
        from .profiling import parse_window

        try:
            parse_window(args.profile)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.activation_checkpointing < 0:
        raise UsageError(f"--activation_checkpointing takes how often a block is checkpointed (1: every block, 2: every "
                         f"other, ...), got {args.activation_checkpointing}.")
    if args.ac_policy != "full" and not args.activation_checkpointing:
        raise UsageError(f"--ac_policy {args.ac_policy} says what a checkpointed block keeps, and no block is "
                         f"checkpointed: add --activation_checkpointing (every block) or --activation_checkpointing 2.")
    if not 0 < args.decay_fraction <= 1:
        raise UsageError(f"--decay_fraction must be in (0, 1], got {args.decay_fraction}: it is the share of "
                         f"--train_steps over which --lr_decay wsd decays the LR.")
    if args.keep_last < 0:
        raise UsageError(f"--keep_last must be 0 (keep all) or more, got {args.keep_last}: it is the number of "
                         f"newest checkpoints kept in --save_prefix.")
    if args.width_noise < 0:
        raise UsageError(f"--width_noise must be 0 or more, got {args.width_noise}: it is the standard deviation of "
                         f"the symmetry-breaking split of width growth (0: an exact copy).")
    if args.restart_warmup_steps < 0:
        raise UsageError(f"--restart_warmup_steps must be 0 or more, got {args.restart_warmup_steps}.")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device cuda was asked for but torch sees no CUDA device (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda or 'none'}). Use --device cpu (or auto), or run where a "
                             f"GPU is visible.")


def _check_paths(args) -> None:
    """--save_prefix must be (or become) a folder this user can write; --tokenizer/--model paths must exist."""
    import json
    import os
    from pathlib import Path

    prefix = Path(args.save_prefix if args.save_prefix is not None else "runs")
    named = f"--save_prefix {prefix}" if args.save_prefix is not None else "the default run folder runs/"
    if prefix.exists() and not prefix.is_dir():
        raise UsageError(f"{named} is a file; it must be a folder (the run's checkpoints and logs go in it). "
                         f"Choose another --save_prefix.")
    existing = prefix
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{named} cannot be created: {existing} is a file. Choose another --save_prefix.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{named} is not writable: this user cannot create files in {existing} (read-only "
                         f"filesystem or permissions). Choose a folder you can write to (--save_prefix), or fix "
                         f"its permissions.")
    problem = tokenizer_path_problem(args.tokenizer) or cache_dir_problem(args.cache_dir)
    if problem:
        raise UsageError(problem)
    if args.resume or args.random or args.model in ("gpt2", None):
        return
    model = Path(args.model).expanduser()
    if not model.exists():
        if looks_like_path(args.model):
            raise UsageError(f"--model {args.model}: no such folder. Give a Hugging Face GPT-2 folder (config.json + "
                             f"weights, e.g. written by `python -m staged_fast.export`) or a hub name; for a random "
                             f"init pass --random (then --model only names the family, gpt2).")
        return  # a hub name: loaded (or refused) by transformers
    config_file = model / "config.json"
    if not config_file.is_file():
        raise UsageError(f"--model {model} is not a Hugging Face model folder (no config.json). Give the folder "
                         f"`save_pretrained` or `python -m staged_fast.export` wrote.")
    try:
        hf = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {model}: its config.json cannot be read ({e}).") from e
    n_positions = hf.get("n_positions", hf.get("n_ctx", hf.get("max_position_embeddings"))) if isinstance(hf, dict) else None
    if isinstance(n_positions, int) and args.seqlen > n_positions:
        stops = "its RoPE tables stop" if hf.get("model_type") == "llama" else "its learned position table stops"
        raise ConfigError(f"--seqlen {args.seqlen} exceeds n_positions={n_positions} of the --model folder {model}: "
                          f"{stops} there. Pass --seqlen {n_positions} or less.")


def restart_value(restart, counter: int, op: str) -> int | None:
    """The step counter a growth at `counter` restarts to: None (--restart_steps not given: it goes on), or R
    ('auto': the counter / the operator's constant, as the paper's schedule assumes)."""
    if restart is None:
        return None
    if restart == "auto":
        from .schedule import constant_op

        return int(round(counter / constant_op(op)))
    return int(restart)


def _check_growths(args) -> None:
    """--restart_steps needs a growth; every --grow_at update must come before the run ends."""
    if args.restart_steps is not None and not (args.grow_at or args.schedule or args.grow_when or args.doubling
                                               or args.resume):
        raise UsageError(f"--restart_steps {args.restart_steps} sets the step counter after a growth, and this run "
                         f"has no growth (no --grow_at, --schedule, --grow_when or --doubling). Drop it, or add the "
                         f"growth it belongs to.")
    if not args.grow_at:
        return
    steps = [int(s) for s in args.grow_at.split(",")]
    if any(s < 1 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
        raise UsageError(f"--grow_at {args.grow_at}: give increasing update numbers, 1 or more (one growth each).")
    if args.resume and args.resume != "latest":
        return  # a checkpoint of another run starts from its own counters; the trainer checks as it goes
    counter, done = 0, 0  # the schedule's step counter and the updates done, as the run will move them
    for at, op in zip(steps, growth_ops(args)):
        counter += at - done
        if counter > args.train_steps:
            ends = at - (counter - args.train_steps)
            raise UsageError(
                f"--grow_at {at} is never reached: the step counter reaches --train_steps {args.train_steps} at "
                f"update {ends}{' (after the earlier growths restart it)' if done else ''}, where the run ends. "
                f"Grow earlier, or raise --train_steps."
            )
        restart = restart_value(args.restart_steps, counter, op)
        if restart is not None and restart >= args.train_steps:
            raise UsageError(
                f"--restart_steps {args.restart_steps} sets the step counter to {restart} at the growth at update "
                f"{at}, and the run ends at --train_steps {args.train_steps}: the grown model would never train. "
                f"Give a --restart_steps below --train_steps (or 'auto').")
        counter, done = counter if restart is None else restart, at


def _plan_lengths(args, given: set[str]) -> tuple[int, int] | None:
    """(updates, the step counter's end) of a --schedule plan given beside a --train_steps of this command; None
    otherwise or when the plan is unreadable (load_plan says so, with the command that makes a plan)."""
    if not args.schedule or "train_steps" not in given:
        return None
    from .schedule import Plan

    try:
        plan = Plan.from_json(args.schedule).to_dict()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return plan["train_steps"], plan["final_schedule_step"]


def _plan_updates_as_length(args, given: set[str]) -> None:
    """A --train_steps equal to the --schedule plan's updates means its length: the run's schedule ends where the
    plan's step counter does (load_plan sets that, and the checkpoint records it), so the requeue of the same
    command must compare that value, not the updates (it was refused as a changed schedule flag)."""
    lengths = _plan_lengths(args, given)
    if lengths is not None and args.train_steps == lengths[0]:
        args.train_steps = lengths[1]


def _check_plan_length(args, given: set[str]) -> None:
    """A --schedule plan sets --train_steps to its final step: a different one given with it would be overridden
    silently (a contradicting --size is refused the same way)."""
    lengths = _plan_lengths(args, given)
    if lengths is None:
        return
    updates, final = lengths
    if args.train_steps not in (updates, final):  # the plan's updates, or where its step counter ends
        raise UsageError(f"--train_steps {args.train_steps} contradicts --schedule {args.schedule}, which takes "
                         f"{updates} updates (its step counter ends at {final}: growths with restarts move it "
                         f"back); drop --train_steps (the plan sets it), or make a plan of {args.train_steps} "
                         f"updates with `python -m staged_fast.schedule plan --train_steps {args.train_steps} ...`.")


def _check_plan(args) -> None:
    """Every stage of a --schedule plan must be its predecessor doubled by the stage's operator."""
    if not args.schedule:
        return
    from .schedule import Plan

    try:
        plan = Plan.from_json(args.schedule)
    except (OSError, ValueError, KeyError, TypeError):
        return  # unreadable: load_plan says so, with the command that makes a plan
    from .growth import GrowthError, grown_config

    for i, (a, b) in enumerate(zip(plan.stages, plan.stages[1:])):
        small, big = a.config(), b.config()
        try:
            grown = grown_config(small, a.grow_op_after)
        except GrowthError:
            raise UsageError(f"--schedule {args.schedule}: stage {i} ends with {a.grow_op_after!r}, which is not a "
                             f"growth operator ({', '.join(GROWTH_OP_NAMES)}).") from None
        if (grown.n_layer, grown.n_embd, grown.n_head) != (big.n_layer, big.n_embd, big.n_head):
            raise UsageError(
                f"--schedule {args.schedule}: stage {i + 1} ({big.shape_str()}) is not a doubling of stage {i} "
                f"({small.shape_str()}): growing it by {a.grow_op_after} gives {grown.shape_str()}. Every growth "
                f"doubles exactly one dimension (width: n_embd and n_head; depth: n_layer). Make the plan with "
                f"`python -m staged_fast.schedule plan`, or fix the stage sizes."
            )
    final = plan.to_dict()["final_schedule_step"]
    if args.warmup_steps > final:
        _warn(f"--warmup_steps {args.warmup_steps} is longer than the plan's {final} steps: the LR rises for the "
              f"whole run and never reaches its peak. Lower --warmup_steps if that is not meant.")
