"""Fused SwiGLU activation in Triton: out = silu(gate) * up, forward and backward in one pass each.

    forward:  out = g * sigmoid(g) * u
    backward: dg = dout * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))),   du = dout * silu(g)

Elementwise over the flattened tensors (BLOCK elements a program), math in fp32, results stored in the
inputs' dtype: the forward reads 2 tensors and writes 1 (torch's eager silu + mul: 5 passes); the backward
reads 3 and writes 2 without saving silu(g). Under autocast gate and up come out of the Linears in the
autocast dtype already, so no cast is needed.

Layers: @triton.jit kernels; launchers `swiglu_forward` / `swiglu_backward`; torch.library ops
(`staged_fast::swiglu`, `staged_fast::swiglu_bwd`) with autograd for torch.compile; autograd.Function
eager path; `swiglu` (public); `swiglu_reference` (plain PyTorch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import cdiv, check_device, check_dtype, new_empty

BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(G, U, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    tl.store(OUT + offs, (g * sig * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DOUT, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    tl.store(DU + offs, (dout * silu).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dout * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


def _check(op: str, *tensors) -> None:
    check_device(op, *tensors)
    for name, t in zip(("gate", "up", "grad"), tensors):
        check_dtype(op, t, name)
    if any(t.shape != tensors[0].shape for t in tensors) or any(t.dtype != tensors[0].dtype for t in tensors):
        raise ValueError(f"{op}: inputs must have one shape and dtype, got "
                         f"{[(tuple(t.shape), t.dtype) for t in tensors]}.")


def swiglu_forward(gate, up):
    _check("swiglu_forward", gate, up)
    return _fwd(gate, up)


def _fwd(gate, up):
    """swiglu_forward without its checks (done once by swiglu)."""
    g, u = gate.contiguous(), up.contiguous()
    out = new_empty(g.shape, dtype=g.dtype, device=g.device)
    n = g.numel()
    if n:
        _swiglu_fwd_kernel[(cdiv(n, BLOCK),)](g, u, out, n, BLOCK=BLOCK, num_warps=4)
    return out


def swiglu_backward(dout, gate, up):
    _check("swiglu_backward", gate, up, dout)
    return _bwd(dout, gate, up)


def _bwd(dout, gate, up):
    """swiglu_backward without its checks: autograd hands it what the forward saved."""
    d, g, u = dout.contiguous(), gate.contiguous(), up.contiguous()
    dg = new_empty(g.shape, dtype=g.dtype, device=g.device)
    du = new_empty(g.shape, dtype=g.dtype, device=g.device)
    n = g.numel()
    if n:
        _swiglu_bwd_kernel[(cdiv(n, BLOCK),)](d, g, u, dg, du, n, BLOCK=BLOCK, num_warps=4)
    return dg, du


@torch.library.custom_op("staged_fast::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu_forward(gate, up)


@torch.library.custom_op("staged_fast::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_backward(dout, gate, up)


@_swiglu_op.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@_swiglu_bwd_op.register_fake
def _(dout, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(gate, memory_format=torch.contiguous_format))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    return _swiglu_bwd_op(dout, gate, up)


_swiglu_op.register_autograd(_backward, setup_context=_setup)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _fwd(gate, up)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        return _bwd(dout, gate, up)


def swiglu(gate, up):
    """silu(gate) * up, fused. gate and up: one shape and dtype (under autocast: the Linears' outputs)."""
    if gate.dtype != up.dtype:  # e.g. one operand computed outside autocast: compute in the wider dtype
        dtype = torch.promote_types(gate.dtype, up.dtype)
        gate, up = gate.to(dtype), up.to(dtype)
    _check("swiglu", gate, up)
    if torch.compiler.is_compiling():
        return _swiglu_op(gate, up)
    return _SwiGLUFunction.apply(gate, up)


def swiglu_reference(gate, up):
    """Plain PyTorch twin: F.silu(gate) * up in the inputs' dtype."""
    return F.silu(gate) * up
