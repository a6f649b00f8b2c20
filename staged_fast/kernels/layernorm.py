"""LayerNorm over the last dimension, optionally fused with the residual add, in Triton.

    y = (s - mean(s)) * rstd * weight + bias,   s = x (+ residual),   rstd = 1 / sqrt(var(s) + eps)

Forward: one program per row; the whole row sits in registers (BLOCK_N = next power of two >= N,
so hidden 384/768/1536 run at 512/1024/2048 lanes with a mask). Fast up to hidden 16384; larger
hidden sizes raise. Statistics (mean, rstd) are computed and saved in fp32 whatever the input dtype.
With a residual, the sum s is rounded to the input dtype, stored (it is the next residual stream),
and normalized as stored, exactly as `F.layer_norm(x + residual)` does in that dtype.

Backward: dx needs only its own row; dweight/dbias need a sum over rows. Each of G programs (G ~ 4
per SM) walks a contiguous range of rows, accumulates its partial dweight/dbias in fp32 registers
and writes one row of a (G, N) fp32 buffer; torch sums the G partials (G x N x 4 bytes, tiny).
With a residual, the gradient arriving at s from later layers is added to dx in the same pass.

Layers: @triton.jit kernels; launchers `layer_norm_forward` / `layer_norm_backward`; torch.library
custom ops (`staged_fast::layer_norm`, `staged_fast::layer_norm_residual`, `staged_fast::layer_norm_bwd`)
with autograd registered, so torch.compile sees one op; `layer_norm` / `layer_norm_residual` (public);
`layer_norm_reference` (plain PyTorch, for tests and benchmarks).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, check_dtype, new_empty, num_sms

MAX_HIDDEN = 16384  # a row must fit in one program's registers


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, W, B, Y, S, Mean, Rstd,  # pointers; R and S only used when HAS_RESIDUAL
    stride_x, stride_r, stride_y, stride_s,  # row strides (columns are contiguous)
    N, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)  # rounded like torch's x + residual in this dtype
        tl.store(S + row * stride_s + cols, s, mask=mask)
        x = s.to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * w + b
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, W, Mean, Rstd, DS, DX, DW_partial, DB_partial,  # DS: grad of the residual sum, if HAS_DS
    stride_dy, stride_x, stride_ds, stride_dx,
    M, N, rows_per_program,
    HAS_DS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    # Row pointers advance by their strides; int64 offsets so M * N > 2**31 elements cannot overflow.
    first = row_start.to(tl.int64)
    dy_ptr, x_ptr, dx_ptr = DY + first * stride_dy, X + first * stride_x, DX + first * stride_dx
    ds_ptr = DS + first * stride_ds
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        wdy = w * dy
        dw += dy * xhat
        db += dy
        # dx = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy*xhat))
        c1 = tl.sum(xhat * wdy, axis=0) / N
        c2 = tl.sum(wdy, axis=0) / N
        dx = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DS:
            dx += tl.load(ds_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            ds_ptr += stride_ds
        tl.store(dx_ptr + cols, dx.to(DX.dtype.element_ty), mask=mask)
        x_ptr += stride_x
        dy_ptr += stride_dy
        dx_ptr += stride_dx
    tl.store(DW_partial + pid * N + cols, dw, mask=mask)
    tl.store(DB_partial + pid * N + cols, db, mask=mask)


def _block_and_warps(n: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n)
    # ~8-16 elements per thread: 4 warps up to 1024 lanes, 8 up to 4096, 16 beyond.
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return block, warps


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(..., N) -> (M, N) with unit column stride, copying only when the layout needs it."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check(op: str, x, weight, bias, residual=None) -> int:
    if weight is None or bias is None:
        raise ValueError(f"{op}: weight and bias are required (elementwise_affine LayerNorm).")
    tensors = [x, weight, bias] + ([residual] if residual is not None else [])
    check_device(op, *tensors)
    for name, t in zip(("x", "weight", "bias", "residual"), tensors):
        check_dtype(op, t, name)
    n = x.shape[-1]
    if weight.shape != (n,) or bias.shape != (n,):
        raise ValueError(f"{op}: weight and bias must have shape ({n},), got {tuple(weight.shape)}, {tuple(bias.shape)}.")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"{op}: residual must match x in shape and dtype, got {tuple(residual.shape)} {residual.dtype} "
            f"vs {tuple(x.shape)} {x.dtype}."
        )
    if n > MAX_HIDDEN:
        raise ValueError(f"{op}: hidden size {n} > {MAX_HIDDEN}; a row must fit in one program.")
    return n


def layer_norm_forward(x, weight, bias, eps: float, residual=None):
    """Launch the forward kernel. Returns (y, s, mean, rstd); s is x + residual (None without residual).

    y and s have x's shape and dtype (contiguous); mean and rstd are fp32 of shape (rows,).
    """
    n = _check("layer_norm_forward", x, weight, bias, residual)
    x2 = _as_rows(x, n)
    m = x2.shape[0]
    y = new_empty((m, n), dtype=x.dtype, device=x.device)
    mean = new_empty((m,), dtype=torch.float32, device=x.device)
    rstd = new_empty((m,), dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = _as_rows(residual, n)
        s = new_empty((m, n), dtype=x.dtype, device=x.device)
    else:
        r2, s = x2, y  # placeholders, never touched when HAS_RESIDUAL is False
    if m > 0:
        block, warps = _block_and_warps(n)
        _layer_norm_fwd_kernel[(m,)](
            x2, r2, weight, bias, y, s, mean, rstd,
            x2.stride(0), r2.stride(0), y.stride(0), s.stride(0),
            n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_N=block, num_warps=warps,
        )
    y = y.view(x.shape)
    return y, (s.view(x.shape) if residual is not None else None), mean, rstd


def layer_norm_backward(dy, x, weight, mean, rstd, ds=None):
    """Launch the backward kernel. x is the normalized input (s with a residual); ds the gradient
    reaching s directly (with a residual), added to dx. Returns (dx, dweight, dbias)."""
    n = x.shape[-1]
    check_device("layer_norm_backward", dy, x, weight, mean, rstd, *([ds] if ds is not None else []))
    if dy.shape != x.shape or (ds is not None and ds.shape != x.shape):
        raise ValueError(f"layer_norm_backward: gradient shape {tuple(dy.shape)} does not match {tuple(x.shape)}.")
    x2, dy2 = _as_rows(x, n), _as_rows(dy, n)
    ds2 = _as_rows(ds, n) if ds is not None else dy2
    m = x2.shape[0]
    dx = new_empty((m, n), dtype=x.dtype, device=x.device)
    groups = max(1, min(m, 4 * num_sms(x.device)))
    rows_per_program = triton.cdiv(m, groups) if m else 0
    dw_partial = new_empty((groups, n), dtype=torch.float32, device=x.device)
    db_partial = new_empty((groups, n), dtype=torch.float32, device=x.device)
    if m > 0:
        block, warps = _block_and_warps(n)
        _layer_norm_bwd_kernel[(groups,)](
            dy2, x2, weight, mean, rstd, ds2, dx, dw_partial, db_partial,
            dy2.stride(0), x2.stride(0), ds2.stride(0), dx.stride(0),
            m, n, rows_per_program,
            HAS_DS=ds is not None, BLOCK_N=block, num_warps=warps,
        )
        dw, db = dw_partial.sum(0), db_partial.sum(0)
    else:
        dw = db = torch.zeros(n, dtype=torch.float32, device=x.device)
    return dx.view(x.shape), dw.to(weight.dtype), db.to(weight.dtype)


# ---- torch.library ops: one opaque op each for torch.compile, autograd registered below ----


@torch.library.custom_op("staged_fast::layer_norm", mutates_args=())
def _ln_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, _, mean, rstd = layer_norm_forward(x, weight, bias, eps)
    return y, mean, rstd


@torch.library.custom_op("staged_fast::layer_norm_residual", mutates_args=())
def _ln_res_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_forward(x, weight, bias, eps, residual)


@torch.library.custom_op("staged_fast::layer_norm_bwd", mutates_args=())
def _ln_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    ds: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_backward(dy, x, weight, mean, rstd, ds)


def _rows(x):
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


@_ln_op.register_fake
def _(x, weight, bias, eps):
    stats = x.new_empty((_rows(x),), dtype=torch.float32)
    return x.new_empty(x.shape), stats, stats.clone()


@_ln_res_op.register_fake
def _(x, residual, weight, bias, eps):
    stats = x.new_empty((_rows(x),), dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(x.shape), stats, stats.clone()


@_ln_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, ds):
    n = x.shape[-1]
    return x.new_empty(x.shape), weight.new_empty((n,)), weight.new_empty((n,))


def _ln_setup(ctx, inputs, output):
    x, weight, _, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _ln_bwd_op(dy, x, weight, mean, rstd, None)
    return dx, dw, db, None


def _ln_res_setup(ctx, inputs, output):
    _, _, weight, _, _ = inputs
    _, s, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(s, weight, mean, rstd)


def _ln_res_backward(ctx, dy, ds, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(s)
    dsum, dw, db = _ln_bwd_op(dy, s, weight, mean, rstd, ds)
    return dsum, dsum, dw, db, None


_ln_op.register_autograd(_ln_backward, setup_context=_ln_setup)
_ln_res_op.register_autograd(_ln_res_backward, setup_context=_ln_res_setup)


# ---- public API ----


def layer_norm(x, weight, bias, eps: float = 1e-5, residual=None):
    """LayerNorm over the last dim. Without residual: y. With residual: (y, s) where s = x + residual
    (the new residual stream) and y = LayerNorm(s); gradients flow through both outputs."""
    if residual is not None:
        return layer_norm_residual(x, residual, weight, bias, eps)
    _check("layer_norm", x, weight, bias)
    y, _, _ = _ln_op(x, weight, bias, float(eps))
    return y


def layer_norm_residual(x, residual, weight, bias, eps: float = 1e-5):
    """(LayerNorm(x + residual), x + residual) in one pass over memory."""
    _check("layer_norm_residual", x, weight, bias, residual)
    y, s, _, _ = _ln_res_op(x, residual, weight, bias, float(eps))
    return y, s


def layer_norm_reference(x, weight, bias, eps: float = 1e-5, residual=None):
    """Plain PyTorch twin of `layer_norm` (same outputs, computed in x's dtype by torch)."""
    if residual is not None:
        s = x + residual
        return torch.nn.functional.layer_norm(s, (s.shape[-1],), weight, bias, eps), s
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
