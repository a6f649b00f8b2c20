"""LayerNorm over the last dimension, optionally fused with the residual add, in Triton.

    y = (s - mean(s)) * rstd * weight + bias,   s = x (+ residual),   rstd = 1 / sqrt(var(s) + eps)

Forward: each program normalizes a tile of BLOCK_M rows x BLOCK_N lanes (BLOCK_N = next power of two
>= N, so hidden 384/768/1536 run at 512/1024/2048 lanes with a mask; BLOCK_M rows so a tile holds about
4096 elements: 4 rows at hidden 768, 2 at 1536). Fast up to hidden 16384; larger hidden sizes raise.
Statistics (mean, rstd) are computed and saved in fp32 whatever the input dtype. With a residual, the
sum s is rounded to the promoted dtype of x and residual (fp32 under autocast, where the branch output
is bf16/fp16 and the residual stream fp32), stored (it is the next residual stream), and normalized as
stored, exactly as `F.layer_norm(x + residual)`. Under autocast y is written in the autocast dtype.

Backward: dx needs only its own row; dweight/dbias need a sum over rows. A grid of G programs (a few
per SM: one wave) strides over the row tiles; each accumulates its partial dweight/dbias in fp32
registers and writes one row of a (G, N) fp32 buffer; one small kernel sums the partials and casts
both to the parameter dtype. Rows per tile, warps and programs per SM are autotuned on a GPU (keyed on
M, N, the flags and the dtypes; STAGED_FAST_NORM_AUTOTUNE=0, or torch.use_deterministic_algorithms(True),
keeps the default). With a residual, the gradient arriving at s from later layers is added to dx in the
same pass, and when the branch x has another dtype than s (autocast: bf16 branch, fp32 stream) dx is
also written in x's dtype, in place of a separate cast. Bytes of the residual backward: reads dy, ds, s, writes dsum (4 tensors; 5 with the
16-bit copy).

Layers: @triton.jit kernels; launchers `layer_norm_forward` / `layer_norm_backward`; torch.library
custom ops (`staged_fast::layer_norm`, `staged_fast::layer_norm_residual`, `staged_fast::layer_norm_bwd`)
with autograd registered, so torch.compile sees one op; `layer_norm` / `layer_norm_residual` (public);
`layer_norm_reference` (plain PyTorch, for tests and benchmarks).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
import triton.testing

from ._common import (INTERPRETED, TunedLaunch, autotuning, cdiv, check_device, check_dtype, env_switch, new_empty,
                      next_power_of_2, num_sms)

MAX_HIDDEN = 16384  # a row must fit in one program's registers


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, W, B, Y, S, Mean, Rstd,  # pointers; R and S only used when HAS_RESIDUAL
    stride_x, stride_r, stride_y, stride_s,  # row strides (columns are contiguous)
    M, N, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)[:, None]  # int64 offsets: M * N may exceed 2**31
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)  # rounded like torch's x + residual in the promoted dtype
        tl.store(S + rows64 * stride_s + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


# Backward configs on a GPU, (BLOCK_M rows per tile, num_warps, programs per SM): the autotuner times
# those that give each thread 4-16 elements of a row tile at this hidden size (_prune_bwd) and keeps
# the fastest per (M, N, flags, dtypes). Why: the fp32 dweight/dbias accumulators and the row tiles live
# in registers, so the tile sets the registers, the registers how many programs an SM holds, and those
# the bytes in flight. Compiled for sm_90a (benchmarks/kernel_resources.py), the first untuned config
# (4 rows x 1024 lanes, 8 warps: 16 elements per thread) took 120-128 registers: two 8-warp programs
# per SM, 2 waves of a 4-per-SM grid; an H200 ran it at ~69% of copy bandwidth. At 4 elements per
# thread it is 40-51 registers (Triton 3.6 and 3.8, compiled as a launch at GPT-2 shapes is) and 5-6
# programs of 8 warps fit; at 8, 63-80 registers (24-32 warps); at 32, 190-242. Programs per SM match
# what fits: one wave, since a program that finds no free slot runs after the others, doubling the time.
_BWD_SHAPES = [(1, 8, 6), (1, 8, 5), (1, 8, 4), (1, 4, 7), (1, 4, 3), (2, 8, 4), (2, 8, 3), (1, 16, 3), (4, 8, 1)]
# Autotuning on (default) or off (the default config: quick, e.g. for GPU tests). Read at each launch;
# set STAGED_FAST_NORM_AUTOTUNE=0 or assign here.
AUTOTUNE = env_switch("STAGED_FAST_NORM_AUTOTUNE")
_THREAD_ELEMENTS = (4, 16)  # elements of a row tile per thread worth timing: fewer idle, more cost registers
RESIDENT_WARPS = 40  # warps of 40-51-register programs one SM surely holds (64K registers, 64 warps)
_MAX_PER_SM = max(max(c[2] for c in _BWD_SHAPES), RESIDENT_WARPS // 4)  # the widest grid, for the partials


def _bwd_config(block_m: int, warps: int, per_sm: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "PROGRAMS_PER_SM": per_sm}, num_warps=warps)


@functools.lru_cache(maxsize=None)
def _default_bwd_config(n: int) -> triton.Config:
    """The untuned config: 4 elements of a row tile per thread (40-51 registers), warps by the row
    length, and as many programs per SM as surely fit at that size (one wave)."""
    block_n = next_power_of_2(n)
    warps = max(4, min(16, block_n // 128))
    block_m = max(1, min(16, 4 * 32 * warps // block_n))
    return _bwd_config(block_m, warps, RESIDENT_WARPS // warps)


def _thread_elements(config: triton.Config, block_n: int) -> int:
    return config.kwargs["BLOCK_M"] * block_n // (32 * config.num_warps)


def _prune_bwd(configs, named_args, **kwargs):
    """The default config for this hidden size first, then the others whose tile gives each thread
    4-16 elements."""
    block_n = kwargs.get("BLOCK_N", named_args.get("BLOCK_N"))
    n = named_args.get("N", kwargs.get("N"))
    default = _default_bwd_config(n)
    lo, hi = _THREAD_ELEMENTS
    kept = [default]
    for c in configs:
        same = c.kwargs == default.kwargs and c.num_warps == default.num_warps
        if lo <= _thread_elements(c, block_n) <= hi and not same:
            kept.append(c)
    return kept


def _time_config(kernel_call, quantiles):
    """The autotuner's timing of one config: 25 ms of calls (hundreds of a ~50 us kernel) instead of
    Triton's default 100, so tuning a new shape costs ~0.2 s a config beyond its compile."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


@triton.autotune(configs=[_bwd_config(*c) for c in _BWD_SHAPES], key=["M", "N", "RMS", "HAS_DS", "HAS_DX2"],
                 prune_configs_by={"early_config_prune": _prune_bwd}, do_bench=_time_config)
@triton.jit
def _norm_bwd_kernel(
    DY, X, W, Mean, Rstd, DS, DX, DX2, DW_partial, DB_partial,  # DS: grad of the residual sum, if HAS_DS
    stride_dy, stride_x, stride_ds, stride_dx,
    M, N,
    RMS: tl.constexpr,  # RMSNorm (staged_fast.kernels.rmsnorm): no mean, no bias; Mean and DB_partial unused
    HAS_DS: tl.constexpr,
    HAS_DX2: tl.constexpr,  # also write dx in DX2's dtype (contiguous): the 16-bit branch's gradient
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PROGRAMS_PER_SM,  # sets the grid on the host; unused here, and not constexpr so that configs differing
    # only in it share one compile (as a constexpr each value compiled the same code again)
):
    """Program p handles row tiles p, p + G, p + 2G, ... (G = the grid, sized to fill the GPU once),
    so consecutive programs read neighbouring tiles at the same time."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    n_tiles = tl.cdiv(M, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in range(pid, n_tiles, n_programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        if RMS:
            xhat = x * rstd[:, None]  # masked lanes load 0
        else:
            mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        dw += dy * xhat
        # dx = rstd * (w*dy - xhat * mean(w*dy*xhat) [- mean(w*dy) for LayerNorm])
        c1 = tl.sum(xhat * wdy, axis=1) / N
        if RMS:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            db += dy
            c2 = tl.sum(wdy, axis=1) / N
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dx = dx.to(DX.dtype.element_ty)
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx, mask=mask)
        if HAS_DX2:  # rounded from the value just stored, as dx.to(dtype) would be
            tl.store(DX2 + rows64 * N + cols[None, :], dx.to(DX2.dtype.element_ty), mask=mask)
    tl.store(DW_partial + pid * N + cols, tl.sum(dw, axis=0), mask=col_ok)
    if not RMS:
        tl.store(DB_partial + pid * N + cols, tl.sum(db, axis=0), mask=col_ok)


@triton.jit
def _sum_partials_kernel(DW_partial, DB_partial, DW, DB, G, N, HAS_DB: tl.constexpr, BLOCK_G: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """dweight (and dbias, HAS_DB) = column sums of the (G, N) fp32 partials, cast to the parameter dtype:
    one launch instead of sums and casts. Shared with the RMSNorm backward (no bias)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        mask = (g[:, None] < G) & col_ok[None, :]
        offs = g[:, None] * N + cols[None, :]
        dw += tl.sum(tl.load(DW_partial + offs, mask=mask, other=0.0), axis=0)
        if HAS_DB:
            db += tl.sum(tl.load(DB_partial + offs, mask=mask, other=0.0), axis=0)
    tl.store(DW + cols, dw.to(DW.dtype.element_ty), mask=col_ok)
    if HAS_DB:
        tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=col_ok)


_launch_norm_bwd = TunedLaunch(_norm_bwd_kernel)


def sum_partials(dw_partial, dw, db_partial=None, db=None) -> None:
    """Launch the column-sum reduction of the backward's (G, N) partials into dw (and db)."""
    groups, n = dw_partial.shape
    has_db = db_partial is not None
    # Narrow column strips, many programs: at hidden 768 with 528 partial rows, 3 programs of 256 columns
    # took 102 us on an H200 (latency-bound serial loops); 24 programs of 32 columns read it in parallel.
    _sum_partials_kernel[(cdiv(n, SUM_COLS),)](
        dw_partial, db_partial if has_db else dw_partial, dw, db if has_db else dw, groups, n,
        HAS_DB=has_db, BLOCK_G=SUM_ROWS, BLOCK_N=SUM_COLS, num_warps=4,
    )


# Tiles: about TILE_ELEMENTS elements per program (several rows when the hidden size is small, so a
# program has enough bytes in flight); warps sized to ~16 elements per thread.
TILE_ELEMENTS = 4096
SUM_COLS, SUM_ROWS = 32, 128  # tile of the partial-sum reduction: (128 partial rows) x (32 columns)


@functools.lru_cache(maxsize=None)
def _tile(n: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N lanes, num_warps) for hidden size n."""
    block_n = next_power_of_2(n)
    block_m = max(1, min(16, TILE_ELEMENTS // block_n))
    warps = max(4, min(16, block_m * block_n // 512))
    return block_m, block_n, warps


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
    if weight.dim() != 1 or weight.shape[0] != n or bias.dim() != 1 or bias.shape[0] != n:
        raise ValueError(f"{op}: weight and bias must have shape ({n},), got {tuple(weight.shape)}, {tuple(bias.shape)}.")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"{op}: residual must match x in shape, got {tuple(residual.shape)} vs {tuple(x.shape)}."
        )
    if n > MAX_HIDDEN:
        raise ValueError(f"{op}: hidden size {n} > {MAX_HIDDEN}; a row must fit in one program.")
    return n


def layer_norm_forward(x, weight, bias, eps: float, residual=None, out_dtype: torch.dtype | None = None):
    """Launch the forward kernel. Returns (y, s, mean, rstd); s is x + residual (None without residual).

    s has the promoted dtype of x and residual (as torch's `x + residual`: under autocast a bf16 branch
    output plus the fp32 residual stream gives fp32); y has `out_dtype` (default: s's dtype, or x's);
    both contiguous. mean and rstd are fp32 of shape (rows,).
    """
    _check("layer_norm_forward", x, weight, bias, residual)
    return _layer_norm_fwd(x, weight, bias, eps, residual, out_dtype)


def _layer_norm_fwd(x, weight, bias, eps, residual, out_dtype):
    """layer_norm_forward without its checks (done once by the public functions)."""
    n = x.shape[-1]
    x2 = _as_rows(x, n)
    m = x2.shape[0]
    s_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    y = new_empty((m, n), dtype=out_dtype or s_dtype, device=x.device)
    mean = new_empty((m,), dtype=torch.float32, device=x.device)
    rstd = new_empty((m,), dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = _as_rows(residual, n)
        s = new_empty((m, n), dtype=s_dtype, device=x.device)
    else:
        r2, s = x2, y  # placeholders, never touched when HAS_RESIDUAL is False
    if m > 0:
        block_m, block_n, warps = _tile(n)
        _layer_norm_fwd_kernel[(cdiv(m, block_m),)](
            x2, r2, weight, bias, y, s, mean, rstd,
            x2.stride(0), r2.stride(0), y.stride(0), s.stride(0),
            m, n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )
    y = y.view(x.shape)
    return y, (s.view(x.shape) if residual is not None else None), mean, rstd


def layer_norm_backward(dy, x, weight, mean, rstd, ds=None, copy_dtype=None):
    """Launch the backward kernels. x is the normalized input (s with a residual); ds the gradient
    reaching s directly (with a residual), added to dx. Returns (dx in x's dtype, dweight, dbias), or
    with `copy_dtype` (dx, dx in copy_dtype, dweight, dbias): the copy is written in the same pass."""
    return norm_backward("layer_norm_backward", dy, x, weight, mean, rstd, ds, copy_dtype)


def _groups(m: int, block_m: int, per_sm: int, sms: int) -> int:
    """The backward's grid: per_sm programs per SM, at most one per row tile."""
    return max(1, min(cdiv(m, block_m), per_sm * sms))


def norm_backward(op: str, dy, x, weight, mean, rstd, ds=None, copy_dtype=None, config=None):
    """The LayerNorm backward, or RMSNorm's with mean=None (no mean, no bias): (dx[, dx copy], dweight
    [, dbias]). `config` (a triton.Config of the backward) bypasses the autotuner: tests run each one."""
    check_device(op, dy, x, weight, rstd, *([mean] if mean is not None else []), *([ds] if ds is not None else []))
    if dy.shape != x.shape or (ds is not None and ds.shape != x.shape):
        raise ValueError(f"{op}: gradient shape {tuple(dy.shape)} does not match {tuple(x.shape)}.")
    return _norm_bwd(dy, x, weight, mean, rstd, ds, copy_dtype, config)


def _norm_bwd(dy, x, weight, mean, rstd, ds=None, copy_dtype=None, config=None):
    """norm_backward without its checks: autograd hands it what the forward saved."""
    rms = mean is None
    n = x.shape[-1]
    x2, dy2 = _as_rows(x, n), _as_rows(dy, n)
    ds2 = _as_rows(ds, n) if ds is not None else dy2
    m = x2.shape[0]
    dx = new_empty((m, n), dtype=x.dtype, device=x.device)
    dx_copy = new_empty((m, n), dtype=copy_dtype, device=x.device) if copy_dtype is not None else None
    dw = new_empty((n,), dtype=weight.dtype, device=x.device)
    db = None if rms else new_empty((n,), dtype=weight.dtype, device=x.device)
    copies = (dx_copy.view(x.shape),) if copy_dtype is not None else ()
    if m == 0:
        return (dx.view(x.shape), *copies, dw.zero_()) + (() if rms else (db.zero_(),))
    sms = num_sms(x.device)
    if config is None and (INTERPRETED or not autotuning(AUTOTUNE)):
        config = _default_bwd_config(n)  # the interpreter has no GPU to time configs on
    # Partial sums: one row per program of the largest grid any config may launch.
    max_groups = _groups(m, 1, _MAX_PER_SM, sms)
    dw_partial = new_empty((max_groups, n), dtype=torch.float32, device=x.device)
    db_partial = dw_partial if rms else new_empty((max_groups, n), dtype=torch.float32, device=x.device)
    grid = lambda meta: (_groups(m, meta["BLOCK_M"], meta["PROGRAMS_PER_SM"], sms),)  # noqa: E731
    args = (dy2, x2, weight, rstd if rms else mean, rstd, ds2, dx, dx_copy if dx_copy is not None else dx,
            dw_partial, db_partial, dy2.stride(0), x2.stride(0), ds2.stride(0), dx.stride(0), m, n)
    flags = dict(RMS=rms, HAS_DS=ds is not None, HAS_DX2=dx_copy is not None, BLOCK_N=next_power_of_2(n))
    if config is None:  # the autotuner's key: M, N, the flags and every tensor argument's dtype
        key = (m, n, rms, ds is not None, copy_dtype, dy.dtype, x.dtype, weight.dtype, ds2.dtype)
        config = _launch_norm_bwd(grid, key, *args, **flags)
    else:
        _norm_bwd_kernel.fn[grid](*args, **flags, **config.all_kwargs())
    groups = _groups(m, config.kwargs["BLOCK_M"], config.kwargs["PROGRAMS_PER_SM"], sms)  # the grid that ran
    if rms:
        sum_partials(dw_partial[:groups], dw)
        return (dx.view(x.shape), *copies, dw)
    sum_partials(dw_partial[:groups], dw, db_partial[:groups], db)
    return (dx.view(x.shape), *copies, dw, db)


def residual_grads(backward, dy, s, x_dtype, residual_dtype, y_dtype, *args, **kwargs):
    """The gradients of x and residual from a norm of s = x + residual, both equal to dsum: `backward`
    (a norm's backward launcher, called as backward(dy, s, *args, copy_dtype=...)) writes dsum in s's
    dtype and, in the same pass, in the 16-bit dtype of the branch (autocast: a bf16 x beside the fp32
    residual stream) instead of a cast afterwards. Returns (dx, dresidual, *parameter grads)."""
    if dy is None:
        dy = torch.zeros(s.shape, dtype=y_dtype, device=s.device)
    other = [d for d in (x_dtype, residual_dtype) if d != s.dtype]
    if not other:
        dsum, *param_grads = backward(dy, s, *args, **kwargs)
        return (dsum, dsum, *param_grads)
    dsum, dcopy, *param_grads = backward(dy, s, *args, copy_dtype=other[0], **kwargs)
    by_dtype = {s.dtype: dsum, other[0]: dcopy}
    # Both differ only for bf16 + fp16 (s in fp32): the second by a cast.
    return (by_dtype.get(x_dtype, dsum.to(x_dtype)), by_dtype.get(residual_dtype, dsum.to(residual_dtype)),
            *param_grads)


# ---- torch.library ops: one opaque op each for torch.compile, autograd registered below ----


@torch.library.custom_op("staged_fast::layer_norm", mutates_args=())
def _ln_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, _, mean, rstd = layer_norm_forward(x, weight, bias, eps, out_dtype=out_dtype)
    return y, mean, rstd


@torch.library.custom_op("staged_fast::layer_norm_residual", mutates_args=())
def _ln_res_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_forward(x, weight, bias, eps, residual, out_dtype=out_dtype)


@torch.library.custom_op("staged_fast::layer_norm_bwd", mutates_args=())
def _ln_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    ds: torch.Tensor | None, copy_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dx in copy_dtype or an empty tensor, dweight, dbias): an op's outputs cannot alias."""
    if copy_dtype is None:
        dx, dw, db = layer_norm_backward(dy, x, weight, mean, rstd, ds)
        return dx, x.new_empty(0), dw, db
    return layer_norm_backward(dy, x, weight, mean, rstd, ds, copy_dtype)


def _ln_bwd_compiled(dy, s, weight, mean, rstd, ds, copy_dtype=None):
    """layer_norm_backward's interface over the op, for residual_grads."""
    dx, dx_copy, dw, db = _ln_bwd_op(dy, s, weight, mean, rstd, ds, copy_dtype)
    return (dx, dw, db) if copy_dtype is None else (dx, dx_copy, dw, db)


def _rows(x):
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


@_ln_op.register_fake
def _(x, weight, bias, eps, out_dtype):
    stats = x.new_empty((_rows(x),), dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), stats, stats.clone()


@_ln_res_op.register_fake
def _(x, residual, weight, bias, eps, out_dtype):
    stats = x.new_empty((_rows(x),), dtype=torch.float32)
    s = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    return x.new_empty(x.shape, dtype=out_dtype), s, stats, stats.clone()


@_ln_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, ds, copy_dtype):
    n = x.shape[-1]
    copy = x.new_empty(x.shape, dtype=copy_dtype) if copy_dtype is not None else x.new_empty(0)
    return x.new_empty(x.shape), copy, weight.new_empty((n,)), weight.new_empty((n,))


def _ln_setup(ctx, inputs, output):
    x, weight, _, _, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _ln_bwd_compiled(dy, x, weight, mean, rstd, None)
    return dx, dw, db, None, None


def _ln_res_setup(ctx, inputs, output):
    x, residual, weight, _, _, _ = inputs
    y, s, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.dtypes = (x.dtype, residual.dtype, y.dtype)


def _ln_res_backward(ctx, dy, ds, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    dx, dr, dw, db = residual_grads(_ln_bwd_compiled, dy, s, *ctx.dtypes, weight, mean, rstd, ds)
    return dx, dr, dw, db, None, None


_ln_op.register_autograd(_ln_backward, setup_context=_ln_setup)
_ln_res_op.register_autograd(_ln_res_backward, setup_context=_ln_res_setup)


# ---- eager path: the same launchers behind a plain autograd.Function ----
# A Python custom op costs tens of microseconds of dispatch per call, more than these kernels take on
# a GPU at GPT-2 sizes; eager training therefore calls the launchers through autograd.Function, and only
# a torch.compile trace (which needs the opaque op) goes through the torch.library registration.


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        y, _, mean, rstd = _layer_norm_fwd(x, weight, bias, eps, None, out_dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _norm_bwd(dy, x, weight, mean, rstd)
        return dx, dw, db, None, None


class _LayerNormResidualFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, out_dtype):
        y, s, mean, rstd = _layer_norm_fwd(x, weight, bias, eps, residual, out_dtype)
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.dtypes = (x.dtype, residual.dtype, y.dtype)
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        s, weight, mean, rstd = ctx.saved_tensors
        dx, dr, dw, db = residual_grads(_norm_bwd, dy, s, *ctx.dtypes, weight, mean, rstd, ds)
        return dx, dr, dw, db, None, None


# ---- public API ----


def _output_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """Under autocast, write y in the autocast dtype: the next op (a Linear) would cast it there anyway,
    and the fp32 -> 16-bit rounding is the same, so this saves a pass and half of y's bytes. Outside
    autocast y keeps the input's dtype, as F.layer_norm."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def layer_norm(x, weight, bias, eps: float = 1e-5, residual=None):
    """LayerNorm over the last dim. Without residual: y. With residual: (y, s) where s = x + residual
    (the new residual stream) and y = LayerNorm(s); gradients flow through both outputs."""
    if residual is not None:
        return layer_norm_residual(x, residual, weight, bias, eps)
    _check("layer_norm", x, weight, bias)
    out_dtype = _output_dtype(x, x.dtype)
    if torch.compiler.is_compiling():
        return _ln_op(x, weight, bias, float(eps), out_dtype)[0]
    return _LayerNormFunction.apply(x, weight, bias, float(eps), out_dtype)


def layer_norm_residual(x, residual, weight, bias, eps: float = 1e-5):
    """(LayerNorm(x + residual), x + residual) in one pass over memory. x and residual may differ in
    dtype (under autocast the branch output is 16-bit, the residual stream fp32): s takes the promoted
    dtype, as torch's `x + residual`."""
    _check("layer_norm_residual", x, weight, bias, residual)
    out_dtype = _output_dtype(x, torch.promote_types(x.dtype, residual.dtype))
    if torch.compiler.is_compiling():
        y, s, _, _ = _ln_res_op(x, residual, weight, bias, float(eps), out_dtype)
        return y, s
    return _LayerNormResidualFunction.apply(x, residual, weight, bias, float(eps), out_dtype)


def layer_norm_reference(x, weight, bias, eps: float = 1e-5, residual=None):
    """Plain PyTorch twin of `layer_norm` (same outputs, computed in x's dtype by torch)."""
    if residual is not None:
        s = x + residual
        return torch.nn.functional.layer_norm(s, (s.shape[-1],), weight, bias, eps), s
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
