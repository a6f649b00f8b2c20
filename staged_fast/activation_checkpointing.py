"""Activation checkpointing of transformer blocks: --activation_checkpointing [EVERY] and --ac_policy.

full: torch's non-reentrant checkpoint keeps only a block's input, and the block's whole forward runs again in
the backward. matmuls (torchtitan's op-level selective checkpointing): the forward also keeps what the block's
matmuls and its attention produced, so the recompute runs only the cheap ops between them (norms, GELU/SwiGLU,
dropout, RoPE, casts, residual adds): less recompute than full, more memory.

Dropout stays exact under both. The checkpoint restores torch's RNG before the recompute, so the random ops draw
the same numbers again, provided the recompute runs each of them in the same order. A kept op is skipped in the
recompute, so an op that draws random numbers itself (torch's SDPA with dropout on) is recomputed, never kept:
skipping it would shift the draws of every later op. The Triton attention takes its seed as an input, drawn by
its own op (recomputed), so it is kept with dropout on too.
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.utils.checkpoint
from torch.utils.checkpoint import CheckpointPolicy, SelectiveCheckpointContext, create_selective_checkpoint_contexts

from .kernels import through_torch_ops

POLICIES = ("full", "matmuls")

# What --ac_policy matmuls keeps: the matmuls (linear layers; bmm for SDPA's math fallback) and every attention
# op. Names, so the Triton op needs no import here (it registers when its kernels are imported).
KEPT_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
    "staged_fast::flash_attention",
})


def draws_random_numbers(func, args, kwargs) -> bool:
    """Whether this call of `func` takes numbers from torch's RNG: its op is tagged as seeded and, where the op has
    a dropout_p argument (the attention ops), that probability is above zero."""
    if torch.Tag.nondeterministic_seeded not in func.tags:
        return False
    names = [a.name for a in func._schema.arguments]
    if "dropout_p" not in names:
        return True
    i = names.index("dropout_p")
    p = kwargs["dropout_p"] if "dropout_p" in kwargs else args[i] if i < len(args) else func._schema.arguments[i].default_value
    return float(p) > 0.0


# Whether the policy sees the outputs it keeps (torch passes them from 2.5 on), which recording_kept_outputs needs.
CAN_RECORD_KEPT = "op_output" in inspect.signature(SelectiveCheckpointContext.__init__).parameters
_recording: list | None = None


@contextlib.contextmanager
def recording_kept_outputs():
    """Yields a list that collects each tensor the matmuls policy keeps in the forward while inside. Memory
    measurements need it: saved_tensors_hooks see what autograd saves, not the checkpoint's cache of kept
    outputs. Stays empty where CAN_RECORD_KEPT is False."""
    global _recording
    outer, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = outer


def keep_matmuls(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """The selective policy: keep the output of a matmul or an attention op that draws no random numbers; every
    other op is recomputed."""
    if func.name() not in KEPT_OPS or draws_random_numbers(func, args, kwargs):
        return CheckpointPolicy.PREFER_RECOMPUTE
    out = getattr(ctx, "op_output", None)
    if _recording is not None and out is not None and not getattr(ctx, "is_recompute", False):
        _recording.extend(t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor))
    return CheckpointPolicy.MUST_SAVE


def _through_ops(block):
    """The block, run with the Triton attention launched through its op, which the selective policy can see and
    keep (the eager autograd.Function's launches are invisible to it). Set inside the call, as the recompute runs
    on the autograd engine's thread, which a context set around the forward would not reach. Under torch.compile
    the ops are taken anyway (and dynamo cannot trace a ContextVar)."""

    @functools.wraps(block)
    def run(*inputs):
        if torch.compiler.is_compiling():
            return block(*inputs)
        with through_torch_ops():
            return block(*inputs)

    return run


def checkpointed(block, *inputs, policy: str = "full"):
    """block(*inputs) under activation checkpointing with `policy` (one of POLICIES)."""
    if policy == "full":
        return torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)
    if policy != "matmuls":
        raise ValueError(f"activation checkpointing policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    return torch.utils.checkpoint.checkpoint(
        _through_ops(block), *inputs, use_reentrant=False,
        context_fn=functools.partial(create_selective_checkpoint_contexts, keep_matmuls))
