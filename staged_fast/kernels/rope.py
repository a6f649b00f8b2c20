"""Rotary position embedding (RoPE, rotate-half layout of HF Llama) as one Triton kernel, forward and backward.

    y[..., :h] = x[..., :h] * cos - x[..., h:] * sin,   y[..., h:] = x[..., h:] * cos + x[..., :h] * sin

on x of shape (B, T, H, head_dim) (the layout a Linear's output has before the heads are transposed), with
cos/sin (T, head_dim / 2) per position, computed once per forward by staged_fast.llama.rope_cos_sin (the same
values as the PyTorch path). Math in fp32, results in the input's dtype, written contiguous (B, T, H, D).
The backward is the rotation by the opposite angle (the transpose): the same kernel with sin negated.

`rope_qk` rotates q (B, T, n_head, D) and k (B, T, n_kv_head, D) in ONE launch each way: program (row, slot)
takes token row = b * T + t and a block of BLOCK_H head slots, the slots numbered q heads first, then k
heads; a slot block below the q blocks rotates q heads, the others k heads (`_rope_kernel` branches on the
slot and hands the chosen tensor's pointers and strides to the one rotation helper `_rotate_heads`). Inputs
are read through their strides (b, t, head, column), so views sliced out of a projection's output and the
transposed gradients of the backward need no copy. The single-tensor `rope` is the same kernel with no k
heads.

Layers: @triton.jit helper + kernel; launcher `rope_qk_forward` (and `rope_forward` for one tensor);
torch.library ops `staged_fast::rope` and `staged_fast::rope_qk` with autograd for torch.compile; one
autograd.Function eager path for both; `rope` / `rope_qk` (public); `rope_reference` / `rope_qk_reference`
(plain PyTorch, the formula of kernels.apply_rope's torch path).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import rope_torch
from ._common import cdiv, check_device, check_dtype, new_empty, next_power_of_2

TILE = 1024  # elements of one half (BLOCK_H x BLOCK_D) a program rotates at most


@triton.jit
def _rotate_heads(X, Y, c, s, x_offset, y_offset, heads, H, stride_xh, stride_xd, stride_yh,
                  HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate heads `heads` (< H) of one token: X at x_offset (any head/column strides), Y at y_offset
    (columns contiguous); c, s the (1, BLOCK_D) fp32 cos/sin of the token, s already signed."""
    cols = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < H) & (cols[None, :] < HALF)
    heads64 = heads.to(tl.int64)[:, None]
    x_ptr = X + x_offset + heads64 * stride_xh + cols[None, :] * stride_xd
    y_ptr = Y + y_offset + heads64 * stride_yh + cols[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + HALF, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, T, HQ, HK, q_blocks,
                 sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d,
                 SIGN: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one token: b * T + t
    slot = tl.program_id(1)  # a block of BLOCK_H head slots: q heads [0, HQ), then k heads [HQ, HQ + HK)
    b = row // T
    t = row % T
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < HALF
    c = tl.load(COS + t * HALF + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    s = SIGN * tl.load(SIN + t * HALF + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if slot < q_blocks:
        heads = slot * BLOCK_H + tl.arange(0, BLOCK_H)
        _rotate_heads(Q, QO, c, s, b * sq_b + t * sq_t, row * HQ * (2 * HALF), heads, HQ, sq_h, sq_d, 2 * HALF,
                      HALF, BLOCK_D)
    else:
        heads = (slot - q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        _rotate_heads(K, KO, c, s, b * sk_b + t * sk_t, row * HK * (2 * HALF), heads, HK, sk_h, sk_d, 2 * HALF,
                      HALF, BLOCK_D)


def rope_qk_forward(q, k, cos, sin, inverse: bool = False, op: str = "rope_qk"):
    """Rotate q (B, T, Hq, D) and k (B, T, Hk, D) (k may be None) by cos/sin (T, D/2) in one launch;
    inverse=True rotates by the opposite angle (the backward). Returns (q_rot, k_rot or None), contiguous."""
    xs = (q,) if k is None else (q, k)
    check_device(op, *xs, cos, sin)
    for name, x in zip(("q", "k"), xs):
        check_dtype(op, x, name)
        if x.dim() != 4 or x.shape[-1] % 2 or x.shape[:2] != q.shape[:2] or x.shape[-1] != q.shape[-1]:
            raise ValueError(f"{op}: {name} must be (B, T, H, head_dim) with an even head_dim and q's B, T and "
                             f"head_dim, got {tuple(x.shape)} (q {tuple(q.shape)}).")
    B, T, HQ, D = q.shape
    HK = k.shape[2] if k is not None else 0
    if cos.shape != (T, D // 2) or sin.shape != (T, D // 2):
        raise ValueError(f"{op}: cos and sin must be ({T}, {D // 2}), got {tuple(cos.shape)}, {tuple(sin.shape)}.")
    cos, sin = cos.contiguous(), sin.contiguous()
    outs = tuple(new_empty(x.shape, dtype=x.dtype, device=x.device) for x in xs)
    block_d = next_power_of_2(max(D // 2, 1))
    block_h = min(next_power_of_2(max(HQ, HK, 1)), max(1, TILE // block_d))
    q_blocks = cdiv(HQ, block_h)
    grid = (B * T, q_blocks + cdiv(HK, block_h))
    if D and grid[0] and grid[1]:
        k_, ko = (k, outs[1]) if k is not None else (q, outs[0])  # no k heads: the k branch never runs
        _rope_kernel[grid](q, k_, outs[0], ko, cos, sin, T, HQ, HK, q_blocks, *q.stride(), *k_.stride(),
                           SIGN=-1.0 if inverse else 1.0, HALF=D // 2, BLOCK_H=block_h, BLOCK_D=block_d,
                           num_warps=4)
    return outs if k is not None else (outs[0], None)


def rope_forward(x, cos, sin, inverse: bool = False):
    """Rotate x (B, T, H, D) by cos/sin (T, D/2): rope_qk_forward without k heads."""
    return rope_qk_forward(x, None, cos, sin, inverse, op="rope")[0]


def _launch(xs, cos, sin, inverse: bool):
    """rope_qk_forward on one tensor or on (q, k): the rotated tensors as a tuple of the same length."""
    q_rot, k_rot = rope_qk_forward(xs[0], xs[1] if len(xs) > 1 else None, cos, sin, inverse,
                                   op="rope_qk" if len(xs) > 1 else "rope")
    return (q_rot,) if k_rot is None else (q_rot, k_rot)


# ---- torch.library ops (torch.compile) ----


@torch.library.custom_op("staged_fast::rope", mutates_args=())
def _rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    return rope_forward(x, cos, sin, inverse)


@torch.library.custom_op("staged_fast::rope_qk", mutates_args=())
def _rope_qk_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_qk_forward(q, k, cos, sin, inverse)


@_rope_op.register_fake
def _(x, cos, sin, inverse):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_rope_qk_op.register_fake
def _(q, k, cos, sin, inverse):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


def _setup(ctx, inputs, output):
    *_, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _rope_backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return _rope_op(dy, cos, sin, not ctx.inverse), None, None, None


def _rope_qk_backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    return *_rope_qk_op(dq, dk, cos, sin, not ctx.inverse), None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_setup)
_rope_qk_op.register_autograd(_rope_qk_backward, setup_context=_setup)


# ---- eager path ----


class _RopeFunction(torch.autograd.Function):
    """Eager path of rope (xs = (x,)) and rope_qk (xs = (q, k)): one launch forward, one backward."""

    @staticmethod
    def forward(ctx, cos, sin, *xs):
        ctx.save_for_backward(cos, sin)
        return _launch(xs, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, *dys):
        cos, sin = ctx.saved_tensors
        return None, None, *_launch(dys, cos, sin, inverse=True)


# ---- public API ----


def rope(x, cos, sin):
    """x (B, T, H, D) rotated per position; cos/sin (T, D/2) (no gradient flows into them)."""
    cos, sin = cos.detach(), sin.detach()
    if torch.compiler.is_compiling():
        return _rope_op(x, cos, sin, False)
    return _RopeFunction.apply(cos, sin, x)[0]


def rope_qk(q, k, cos, sin):
    """(q_rot, k_rot): q (B, T, n_head, D) and k (B, T, n_kv_head, D), any strides, rotated per position by
    cos/sin (T, D/2) in one kernel launch (and one for the backward); no gradient flows into cos/sin."""
    cos, sin = cos.detach(), sin.detach()
    if torch.compiler.is_compiling():
        return _rope_qk_op(q, k, cos, sin, False)
    return _RopeFunction.apply(cos, sin, q, k)


def rope_reference(x, cos, sin):
    """Plain PyTorch twin on (B, T, H, D): the formula of kernels.apply_rope's torch path."""
    return rope_torch(x, cos, sin)


def rope_qk_reference(q, k, cos, sin):
    """Plain PyTorch twin of rope_qk: the reference rotation of each tensor (kernels.apply_rope_qk's torch path)."""
    return rope_torch(q, cos, sin), rope_torch(k, cos, sin)
