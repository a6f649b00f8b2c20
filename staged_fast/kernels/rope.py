"""Rotary position embedding (RoPE, rotate-half layout of HF Llama) as one Triton kernel, forward and backward.

    y[..., :h] = x[..., :h] * cos - x[..., h:] * sin,   y[..., h:] = x[..., h:] * cos + x[..., :h] * sin

on x of shape (B, T, H, head_dim) (the layout a Linear's output has before the heads are transposed), with
cos/sin (T, head_dim / 2) per position, computed once per forward by staged_fast.llama.rope_cos_sin (the same
values as the PyTorch path). One program rotates all heads of one token: it reads x once and writes y once
(torch's eager formula takes a cat, two products and a sum). The backward is the rotation by the opposite
angle (the transpose): the same kernel with sin negated. Math in fp32, results in x's dtype.

Layers: @triton.jit kernel; launcher `rope_forward`; torch.library op `staged_fast::rope` with autograd for
torch.compile; autograd.Function eager path; `rope` (public); `rope_reference` (plain PyTorch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, check_dtype, new_empty


@triton.jit
def _rope_kernel(X, COS, SIN, Y, T, H, stride_row, stride_head, SIGN: tl.constexpr,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)  # one token: b * T + t
    t = row % T
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < HALF
    mask = (heads[:, None] < H) & col_ok[None, :]
    c = tl.load(COS + t * HALF + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    s = SIGN * tl.load(SIN + t * HALF + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    base = row.to(tl.int64) * stride_row + heads[:, None] * stride_head + cols[None, :]
    x1 = tl.load(X + base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + base + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + base, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + base + HALF, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


def rope_forward(x, cos, sin, inverse: bool = False):
    """Rotate x (B, T, H, D) by cos/sin (T, D/2); inverse=True rotates by the opposite angle (the backward)."""
    check_device("rope", x, cos, sin)
    check_dtype("rope", x, "x")
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rope: x must be (B, T, H, head_dim) with an even head_dim, got {tuple(x.shape)}.")
    B, T, H, D = x.shape
    if cos.shape != (T, D // 2) or sin.shape != (T, D // 2):
        raise ValueError(f"rope: cos and sin must be ({T}, {D // 2}), got {tuple(cos.shape)}, {tuple(sin.shape)}.")
    x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    y = new_empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        _rope_kernel[(B * T,)](x, cos, sin, y, T, H, H * D, D, SIGN=-1.0 if inverse else 1.0, HALF=D // 2,
                               BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D // 2),
                               num_warps=4)
    return y


@torch.library.custom_op("staged_fast::rope", mutates_args=())
def _rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    return rope_forward(x, cos, sin, inverse)


@_rope_op.register_fake
def _(x, cos, sin, inverse):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return _rope_op(dy, cos, sin, not ctx.inverse), None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup)


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_forward(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rope_forward(dy, cos, sin, inverse=True), None, None


def rope(x, cos, sin):
    """x (B, T, H, D) rotated per position; cos/sin (T, D/2) (no gradient flows into them)."""
    cos, sin = cos.detach(), sin.detach()
    if torch.compiler.is_compiling():
        return _rope_op(x, cos, sin, False)
    return _RopeFunction.apply(x, cos, sin)


def rope_reference(x, cos, sin):
    """Plain PyTorch twin on (B, T, H, D): the formula of kernels.apply_rope's torch path."""
    c = torch.cat((cos, cos), dim=-1)[None, :, None, :]
    s = torch.cat((sin, sin), dim=-1)[None, :, None, :]
    half = x.shape[-1] // 2
    return x * c + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * s
