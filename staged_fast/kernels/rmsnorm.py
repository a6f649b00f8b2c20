"""RMSNorm over the last dimension, optionally fused with the residual add, in Triton (the llama family).

    y = s * rstd * weight,   s = x (+ residual),   rstd = 1 / sqrt(mean(s^2) + eps)

Same layout as layernorm.py: the forward normalizes a tile of BLOCK_M rows x BLOCK_N lanes per program,
saving rstd in fp32; with a residual, s is rounded to the promoted dtype of x and residual (fp32 under
autocast) and stored (the next residual stream). Under autocast y is written in the autocast dtype.
Backward: dx = rstd * (w*dy - xhat * mean(xhat * w*dy)) (+ the gradient reaching s directly), dweight
summed over rows through per-program fp32 partials and one reduce-and-cast kernel.

Layers: @triton.jit kernels; launchers `rms_norm_forward` / `rms_norm_backward`; torch.library custom ops
(`staged_fast::rms_norm`, `staged_fast::rms_norm_residual`, `staged_fast::rms_norm_bwd`) with autograd, so
torch.compile sees one op; autograd.Function eager path; `rms_norm` / `rms_norm_residual` (public);
`rms_norm_reference` (plain PyTorch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, check_device, check_dtype, new_empty
from .layernorm import MAX_HIDDEN, _as_rows, _norm_bwd, _output_dtype, _rows, _tile, norm_backward, residual_grads


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, S, Rstd,
    stride_x, stride_r, stride_y, stride_s,
    M, N, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)
        tl.store(S + rows64 * stride_s + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    ms = tl.sum(x * x, axis=1) / N
    rstd = 1.0 / tl.sqrt(ms + eps)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + rows, rstd, mask=row_ok)


def _check(op: str, x, weight, residual=None) -> int:
    if weight is None:
        raise ValueError(f"{op}: weight is required.")
    tensors = [x, weight] + ([residual] if residual is not None else [])
    check_device(op, *tensors)
    for name, t in zip(("x", "weight", "residual"), tensors):
        check_dtype(op, t, name)
    n = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(f"{op}: weight must have shape ({n},), got {tuple(weight.shape)}.")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{op}: residual must match x in shape, got {tuple(residual.shape)} vs {tuple(x.shape)}.")
    if n > MAX_HIDDEN:
        raise ValueError(f"{op}: hidden size {n} > {MAX_HIDDEN}; a row must fit in one program.")
    return n


def rms_norm_forward(x, weight, eps: float, residual=None, out_dtype: torch.dtype | None = None):
    """Returns (y, s, rstd); s = x + residual in the promoted dtype (None without residual)."""
    _check("rms_norm_forward", x, weight, residual)
    return _rms_norm_fwd(x, weight, eps, residual, out_dtype)


def _rms_norm_fwd(x, weight, eps, residual, out_dtype):
    """rms_norm_forward without its checks (done once by the public functions)."""
    n = x.shape[-1]
    x2 = _as_rows(x, n)
    m = x2.shape[0]
    s_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    y = new_empty((m, n), dtype=out_dtype or s_dtype, device=x.device)
    rstd = new_empty((m,), dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = _as_rows(residual, n)
        s = new_empty((m, n), dtype=s_dtype, device=x.device)
    else:
        r2, s = x2, y
    if m > 0:
        block_m, block_n, warps = _tile(n)
        _rms_norm_fwd_kernel[(cdiv(m, block_m),)](
            x2, r2, weight, y, s, rstd, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0), m, n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )
    return y.view(x.shape), (s.view(x.shape) if residual is not None else None), rstd


def rms_norm_backward(dy, x, weight, rstd, ds=None, copy_dtype=None):
    """(dx in x's dtype, dweight); x is the normalized input (s with a residual), ds added to dx. The
    LayerNorm backward kernel without its mean and bias terms (layernorm.norm_backward)."""
    return norm_backward("rms_norm_backward", dy, x, weight, None, rstd, ds, copy_dtype)


# ---- torch.library ops (torch.compile) ----


@torch.library.custom_op("staged_fast::rms_norm", mutates_args=())
def _rms_op(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = rms_norm_forward(x, weight, eps, out_dtype=out_dtype)
    return y, rstd


@torch.library.custom_op("staged_fast::rms_norm_residual", mutates_args=())
def _rms_res_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rms_norm_forward(x, weight, eps, residual, out_dtype=out_dtype)


@torch.library.custom_op("staged_fast::rms_norm_bwd", mutates_args=())
def _rms_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, ds: torch.Tensor | None,
    copy_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dx in copy_dtype or an empty tensor, dweight): an op's outputs cannot alias."""
    if copy_dtype is None:
        dx, dw = rms_norm_backward(dy, x, weight, rstd, ds)
        return dx, x.new_empty(0), dw
    return rms_norm_backward(dy, x, weight, rstd, ds, copy_dtype)


def _rms_bwd_compiled(dy, s, weight, rstd, ds, copy_dtype=None):
    """rms_norm_backward's interface over the op, for residual_grads."""
    dx, dx_copy, dw = _rms_bwd_op(dy, s, weight, rstd, ds, copy_dtype)
    return (dx, dw) if copy_dtype is None else (dx, dx_copy, dw)


@_rms_op.register_fake
def _(x, weight, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty((_rows(x),), dtype=torch.float32)


@_rms_res_op.register_fake
def _(x, residual, weight, eps, out_dtype):
    s = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    return x.new_empty(x.shape, dtype=out_dtype), s, x.new_empty((_rows(x),), dtype=torch.float32)


@_rms_bwd_op.register_fake
def _(dy, x, weight, rstd, ds, copy_dtype):
    copy = x.new_empty(x.shape, dtype=copy_dtype) if copy_dtype is not None else x.new_empty(0)
    return x.new_empty(x.shape), copy, weight.new_empty((x.shape[-1],))


def _rms_setup(ctx, inputs, output):
    x, weight, _, _ = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)


def _rms_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_bwd_compiled(dy, x, weight, rstd, None)
    return dx, dw, None, None


def _rms_res_setup(ctx, inputs, output):
    x, residual, weight, _, _ = inputs
    y, s, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(s, weight, rstd)
    ctx.dtypes = (x.dtype, residual.dtype, y.dtype)


def _rms_res_backward(ctx, dy, ds, _drstd):
    s, weight, rstd = ctx.saved_tensors
    dx, dr, dw = residual_grads(_rms_bwd_compiled, dy, s, *ctx.dtypes, weight, rstd, ds)
    return dx, dr, dw, None, None


_rms_op.register_autograd(_rms_backward, setup_context=_rms_setup)
_rms_res_op.register_autograd(_rms_res_backward, setup_context=_rms_res_setup)


# ---- eager path ----


def _rms_bwd_eager(dy, s, weight, rstd, ds, copy_dtype=None):
    """rms_norm_backward without its checks: autograd hands it what the forward saved."""
    return _norm_bwd(dy, s, weight, None, rstd, ds, copy_dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        y, _, rstd = _rms_norm_fwd(x, weight, eps, None, out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _norm_bwd(dy, x, weight, None, rstd)
        return dx, dw, None, None


class _RMSNormResidualFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, out_dtype):
        y, s, rstd = _rms_norm_fwd(x, weight, eps, residual, out_dtype)
        ctx.save_for_backward(s, weight, rstd)
        ctx.dtypes = (x.dtype, residual.dtype, y.dtype)
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        s, weight, rstd = ctx.saved_tensors
        dx, dr, dw = residual_grads(_rms_bwd_eager, dy, s, *ctx.dtypes, weight, rstd, ds)
        return dx, dr, dw, None, None


# ---- public API ----


def rms_norm(x, weight, eps: float = 1e-6, residual=None):
    """RMSNorm over the last dim; with residual: (y, s), s = x + residual, y = RMSNorm(s)."""
    if residual is not None:
        return rms_norm_residual(x, residual, weight, eps)
    _check("rms_norm", x, weight)
    out_dtype = _output_dtype(x, x.dtype)
    if torch.compiler.is_compiling():
        return _rms_op(x, weight, float(eps), out_dtype)[0]
    return _RMSNormFunction.apply(x, weight, float(eps), out_dtype)


def rms_norm_residual(x, residual, weight, eps: float = 1e-6):
    """(RMSNorm(x + residual), x + residual) in one pass; s in the promoted dtype of x and residual."""
    _check("rms_norm_residual", x, weight, residual)
    out_dtype = _output_dtype(x, torch.promote_types(x.dtype, residual.dtype))
    if torch.compiler.is_compiling():
        y, s, _ = _rms_res_op(x, residual, weight, float(eps), out_dtype)
        return y, s
    return _RMSNormResidualFunction.apply(x, residual, weight, float(eps), out_dtype)


def rms_norm_reference(x, weight, eps: float = 1e-6, residual=None):
    """Plain PyTorch twin (staged_fast.llama.rms_norm: statistics in fp32, or fp64 for fp64)."""
    from ..llama import rms_norm as torch_rms_norm

    if residual is not None:
        s = x + residual
        return torch_rms_norm(s, weight, eps), s
    return torch_rms_norm(x, weight, eps)
