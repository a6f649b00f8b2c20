"""Causal flash attention (forward and backward) in Triton, with optional in-kernel dropout.

    O = dropout(softmax(Q K^T / sqrt(hs) + causal mask)) V        Q, K, V, O: (B, nh, T, hs)

Forward (FlashAttention-2): one program per (BLOCK_M query rows, batch*head); it streams key/value
blocks, keeps the running max m and sum l of the softmax in fp32 (online softmax, base-2 exponent),
and saves lse = m + log2(l) per row (B*nh*T fp32). No T x T matrix ever exists in memory.
Key blocks strictly below the diagonal run without masks; only the diagonal blocks apply the causal
and sequence-tail masks, so any T works (rows/keys past T are masked on load and never stored).
head_dim 96 runs with BLOCK_D = 128 and a mask over the padded lanes (so 25% wasted dot work).

Backward: `delta = rowsum(dO * O)` (a small kernel), then one kernel per key block accumulating dK, dV
over the query blocks at or after it, and one kernel per query block accumulating dQ over the key
blocks at or before it. P is recomputed from the saved lse; nothing is atomically added, so the
gradients are deterministic.

Dropout (p > 0): keep(b, h, i, j) = tl.rand(seed + b*nh + h, i*T + j) >= p, the kept probabilities are
scaled by 1/(1-p); the backward regenerates the same mask from the same seed. The seed is drawn from
torch's RNG on the inputs' device (`torch.randint`), so runs are reproducible under `torch.manual_seed`
(but the mask differs from SDPA's). `dropout_mask` materializes the mask, for tests.
The row sum l is taken before dropout: dropout rescales the normalized probabilities, as in torch.

dtypes: fp16/bf16 (dots on tensor cores, fp32 accumulation) and fp32 (exact "ieee" dots, for tests).
Under TRITON_INTERPRET=1 all dots run in fp32 because the interpreter's bf16 dot is wrong.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, check_device, check_dtype, dot_precision, new_empty

HEAD_DIMS = (16, 32, 64, 96, 128)  # 96 (the paper's presets) is padded to a block of 128
LOG2E = 1.4426950408889634


@triton.jit
def _keep_mask(seed, off_bh, offs_m, offs_n, T, dropout_p):
    """Dropout keep mask for a (BLOCK_M, BLOCK_N) tile; one Philox stream per (batch, head)."""
    rng_offsets = offs_m[:, None] * T + offs_n[None, :]
    return tl.rand(seed + off_bh, rng_offsets) >= dropout_p


@triton.jit
def _attn_fwd_tile(
    acc, l_i, m_i, q, K_ptr, V_ptr, stride_kn, stride_vn, offs_m, offs_d, start_n, T, HEAD_DIM,
    qk_scale, seed, off_bh, dropout_p,
    MASKED: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n[None, :] < T) & (offs_d[:, None] < HEAD_DIM)
    kT = tl.load(K_ptr + offs_n[None, :] * stride_kn + offs_d[:, None], mask=kv_mask, other=0.0)  # (D, N)
    if UPCAST:
        kT = kT.to(tl.float32)
    s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale  # (M, N), log2 units
    if MASKED:
        s = tl.where((offs_m[:, None] >= offs_n[None, :]) & (offs_n[None, :] < T), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        keep = _keep_mask(seed, off_bh, offs_m, offs_n, T, dropout_p)
        p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
    v = tl.load(V_ptr + offs_n[:, None] * stride_vn + offs_d[None, :], mask=tl.trans(kv_mask), other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, Seed,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    H, T, HEAD_DIM, qk_scale, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    Q_ptr = Q + off_b * stride_qb + off_h * stride_qh
    K_ptr = K + off_b * stride_kb + off_h * stride_kh
    V_ptr = V + off_b * stride_vb + off_h * stride_vh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Key blocks entirely at or below every row of this query block: no mask (BLOCK_M % BLOCK_N == 0).
    diag_start = pid_m * BLOCK_M
    for start_n in range(0, diag_start, BLOCK_N):
        acc, l_i, m_i = _attn_fwd_tile(
            acc, l_i, m_i, q, K_ptr, V_ptr, stride_kn, stride_vn, offs_m, offs_d, start_n, T, HEAD_DIM,
            qk_scale, seed, off_bh, dropout_p,
            False, DROPOUT, UPCAST, PRECISION, BLOCK_N,
        )
    # Diagonal blocks: causal mask and the sequence tail.
    diag_end = tl.minimum(diag_start + BLOCK_M, T)
    for start_n in range(diag_start, diag_end, BLOCK_N):
        acc, l_i, m_i = _attn_fwd_tile(
            acc, l_i, m_i, q, K_ptr, V_ptr, stride_kn, stride_vn, offs_m, offs_d, start_n, T, HEAD_DIM,
            qk_scale, seed, off_bh, dropout_p,
            True, DROPOUT, UPCAST, PRECISION, BLOCK_N,
        )
    acc = acc / l_i[:, None]
    O_ptr = O + off_b * stride_ob + off_h * stride_oh
    tl.store(O_ptr + offs_m[:, None] * stride_om + offs_d[None, :], acc.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + off_bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, Delta, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
    H, T, HEAD_DIM, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[i] = sum_d dO[i, d] * O[i, d] (fp32), the softmax-backward row term."""
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + off_bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_tile(
    dk, dv, k, v, Q_ptr, DO_ptr, LSE_ptr, Delta_ptr, stride_qm, stride_dom, offs_n, offs_d, start_m, T,
    HEAD_DIM, qk_scale, seed, off_bh, dropout_p,
    MASKED: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :], mask=mask, other=0.0)  # (M, D)
    do = tl.load(DO_ptr + offs_m[:, None] * stride_dom + offs_d[None, :], mask=mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    # Rows past T load q = dO = lse = delta = 0, so their p is finite and dp - delta = 0: they add nothing.
    lse = tl.load(LSE_ptr + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta_ptr + offs_m, mask=row_ok, other=0.0)
    sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (N, M)
    pT = tl.math.exp2(sT - lse[None, :])
    if MASKED:
        pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (N, M) = (dO V^T)^T
    if DROPOUT:
        keepT = tl.trans(_keep_mask(seed, off_bh, offs_m, offs_n, T, dropout_p))
        pdT = tl.where(keepT, pT / (1.0 - dropout_p), 0.0)
        dpT = tl.where(keepT, dpT / (1.0 - dropout_p), 0.0)
    else:
        pdT = pT
    dv = tl.dot(pdT.to(do.dtype), do, dv, input_precision=PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DV, Seed,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn,
    H, T, HEAD_DIM, qk_scale, sm_scale, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    Q_ptr = Q + off_b * stride_qb + off_h * stride_qh
    DO_ptr = DO + off_b * stride_dob + off_h * stride_doh
    LSE_ptr = LSE + off_bh.to(tl.int64) * T
    Delta_ptr = Delta + off_bh.to(tl.int64) * T
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query blocks overlapping this key block's diagonal: causal mask (BLOCK_N % BLOCK_M == 0).
    diag_end = tl.minimum(start_n + BLOCK_N, T)
    for start_m in range(start_n, diag_end, BLOCK_M):
        dk, dv = _attn_bwd_dkdv_tile(
            dk, dv, k, v, Q_ptr, DO_ptr, LSE_ptr, Delta_ptr, stride_qm, stride_dom, offs_n, offs_d, start_m, T,
            HEAD_DIM, qk_scale, seed, off_bh, dropout_p,
            True, DROPOUT, UPCAST, PRECISION, BLOCK_M,
        )
    # Query blocks entirely after the key block: every (query, key) pair is allowed.
    for start_m in range(start_n + BLOCK_N, T, BLOCK_M):
        dk, dv = _attn_bwd_dkdv_tile(
            dk, dv, k, v, Q_ptr, DO_ptr, LSE_ptr, Delta_ptr, stride_qm, stride_dom, offs_n, offs_d, start_m, T,
            HEAD_DIM, qk_scale, seed, off_bh, dropout_p,
            False, DROPOUT, UPCAST, PRECISION, BLOCK_M,
        )
    dk = dk * sm_scale
    out = off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=kv_mask)  # DK and DV share one layout
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_tile(
    dq, q, do, lse, delta, K_ptr, V_ptr, stride_kn, stride_vn, offs_m, offs_d, start_n, T, HEAD_DIM,
    qk_scale, seed, off_bh, dropout_p,
    MASKED: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K_ptr + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)  # (N, D)
    v = tl.load(V_ptr + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (M, N)
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where((offs_m[:, None] >= offs_n[None, :]) & (offs_n[None, :] < T), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if DROPOUT:
        keep = _keep_mask(seed, off_bh, offs_m, offs_n, T, dropout_p)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ, Seed,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    H, T, HEAD_DIM, qk_scale, sm_scale, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    K_ptr = K + off_b * stride_kb + off_h * stride_kh
    V_ptr = V + off_b * stride_vb + off_h * stride_vh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + off_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + off_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag_start = pid_m * BLOCK_M
    for start_n in range(0, diag_start, BLOCK_N):  # below the diagonal: no mask (BLOCK_M % BLOCK_N == 0)
        dq = _attn_bwd_dq_tile(
            dq, q, do, lse, delta, K_ptr, V_ptr, stride_kn, stride_vn, offs_m, offs_d, start_n, T, HEAD_DIM,
            qk_scale, seed, off_bh, dropout_p,
            False, DROPOUT, UPCAST, PRECISION, BLOCK_N,
        )
    diag_end = tl.minimum(diag_start + BLOCK_M, T)
    for start_n in range(diag_start, diag_end, BLOCK_N):
        dq = _attn_bwd_dq_tile(
            dq, q, do, lse, delta, K_ptr, V_ptr, stride_kn, stride_vn, offs_m, offs_d, start_n, T, HEAD_DIM,
            qk_scale, seed, off_bh, dropout_p,
            True, DROPOUT, UPCAST, PRECISION, BLOCK_N,
        )
    dq = dq * sm_scale
    DQ_ptr = DQ + off_b * stride_dqb + off_h * stride_dqh
    tl.store(DQ_ptr + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _dropout_mask_kernel(Seed, Out, H, T, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_n, off_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep_mask(tl.load(Seed), off_bh, offs_m, offs_n, T, dropout_p)
    ptrs = Out + off_bh.to(tl.int64) * T * T + offs_m[:, None] * T + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < T) & (offs_n[None, :] < T))


# ---- host launchers ----


def _blocks(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes. The forward/dQ loops need BLOCK_M % BLOCK_N == 0, the dK/dV loop BLOCK_N % BLOCK_M == 0.

    GPU values follow the FlashAttention-2 Triton recipe for 16-bit inputs (fwd 128x64, bwd 32x128 /
    128x32) and halve the tiles for fp32 (twice the shared memory per element) and for BLOCK_D = 128.
    Under the interpreter, 32x16 tiles keep tests fast and still exercise multi-block and tail paths.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if INTERPRETED:
        return dict(BLOCK_D=block_d, fwd=(32, 16, 4, 1), dkdv=(16, 32, 4, 1), dq=(32, 16, 4, 1))
    big = dtype != torch.float32 and block_d <= 64
    if dtype == torch.float32:
        return dict(BLOCK_D=block_d, fwd=(64, 32, 4, 2), dkdv=(32, 64, 4, 2), dq=(64, 32, 4, 2))
    return dict(
        BLOCK_D=block_d,
        fwd=(128, 64, 4 if big else 8, 3),
        dkdv=(32, 128 if big else 64, 4 if big else 8, 2),
        dq=(128 if big else 64, 32, 4 if big else 8, 2),
    )


def _check_qkv(q, k, v):
    op = "flash_attention"
    check_device(op, q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dtype(op, t, name)
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be (B, n_head, T, head_dim), got shape {tuple(t.shape)}.")
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} needs a contiguous last (head_dim) dimension, got strides {t.stride()}.")
    if not (q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"{op}: q, k, v must share shape and dtype, got {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} "
            f"and {q.dtype}/{k.dtype}/{v.dtype}."
        )
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(
            f"{op}: head_dim {q.shape[-1]} is not supported; supported: {HEAD_DIMS}. "
            f"Choose n_head so that n_embd / n_head is one of them, or use --kernels torch."
        )


def _check_dropout(dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"flash_attention: dropout_p must be in [0, 1), got {dropout_p}.")


def new_seed(device) -> torch.Tensor:
    """A dropout seed drawn from torch's RNG on `device` (reproducible under torch.manual_seed, no host sync)."""
    return torch.randint(0, 2**31 - 2**20, (1,), device=device, dtype=torch.int64)


def flash_attention_forward(q, k, v, dropout_p: float = 0.0, seed: torch.Tensor | None = None):
    """Launch the forward. Returns (o, lse): o (B, nh, T, hs) contiguous in q's dtype, lse (B, nh, T)
    fp32 in log2 units (lse2 = log2 sum_j exp2(s_ij), s in log2 units). `seed` is needed when dropout_p > 0."""
    _check_qkv(q, k, v)
    _check_dropout(dropout_p)
    B, H, T, D = q.shape
    o = new_empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = new_empty((B, H, T), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    dropout = dropout_p > 0.0
    if dropout and seed is None:
        raise ValueError("flash_attention_forward: dropout_p > 0 needs a seed tensor (see new_seed).")
    cfg = _blocks(D, q.dtype)
    bm, bn, warps, stages = cfg["fwd"]
    _attn_fwd_kernel[(triton.cdiv(T, bm), B * H)](
        q, k, v, o, lse, seed if dropout else lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, T, D, LOG2E / math.sqrt(D), dropout_p,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg["BLOCK_D"],
        DROPOUT=dropout, UPCAST=INTERPRETED, PRECISION=dot_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    return o, lse


def flash_attention_backward(do, q, k, v, o, lse, dropout_p: float = 0.0, seed: torch.Tensor | None = None):
    """Launch the backward kernels. Returns (dq, dk, dv), contiguous, in q's dtype."""
    _check_qkv(q, k, v)
    if do.shape != q.shape:
        raise ValueError(f"flash_attention_backward: grad shape {tuple(do.shape)} != {tuple(q.shape)}.")
    if do.stride(-1) != 1:
        do = do.contiguous()
    B, H, T, D = q.shape
    dq = new_empty((B, H, T, D), dtype=q.dtype, device=q.device)
    dk = new_empty((B, H, T, D), dtype=q.dtype, device=q.device)
    dv = new_empty((B, H, T, D), dtype=q.dtype, device=q.device)
    if dq.numel() == 0:
        return dq, dk, dv
    dropout = dropout_p > 0.0
    cfg = _blocks(D, q.dtype)
    block_d = cfg["BLOCK_D"]
    prec = dot_precision(q.dtype)
    delta = new_empty((B, H, T), dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(T, 64), B * H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, T, D, BLOCK_M=64, BLOCK_D=block_d,
    )
    seed_arg = seed if dropout else lse
    scales = (LOG2E / math.sqrt(D), 1.0 / math.sqrt(D), dropout_p)
    bm, bn, warps, stages = cfg["dkdv"]
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, bn), B * H)](
        q, k, v, do, lse, delta, dk, dv, seed_arg,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
        H, T, D, *scales,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, DROPOUT=dropout, UPCAST=INTERPRETED, PRECISION=prec,
        num_warps=warps, num_stages=stages,
    )
    bm, bn, warps, stages = cfg["dq"]
    _attn_bwd_dq_kernel[(triton.cdiv(T, bm), B * H)](
        q, k, v, do, lse, delta, dq, seed_arg,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        H, T, D, *scales,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, DROPOUT=dropout, UPCAST=INTERPRETED, PRECISION=prec,
        num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv


def dropout_mask(seed: torch.Tensor, B: int, H: int, T: int, dropout_p: float) -> torch.Tensor:
    """The (B, H, T, T) keep mask (bool) the kernels use for `seed` (tests and debugging only: O(T^2))."""
    out = torch.empty((B, H, T, T), dtype=torch.int8, device=seed.device)
    _dropout_mask_kernel[(triton.cdiv(T, 32), triton.cdiv(T, 32), B * H)](seed, out, H, T, dropout_p, BLOCK_M=32, BLOCK_N=32)
    return out.bool()


# ---- torch.library ops (one opaque op each for torch.compile) and autograd ----


@torch.library.custom_op("staged_fast::flash_attention", mutates_args=())
def _attn_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return flash_attention_forward(q, k, v, dropout_p, seed)


@torch.library.custom_op("staged_fast::flash_attention_bwd", mutates_args=())
def _attn_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    dropout_p: float, seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return flash_attention_backward(do, q, k, v, o, lse, dropout_p, seed)


@_attn_op.register_fake
def _(q, k, v, dropout_p, seed):
    B, H, T, D = q.shape
    return q.new_empty((B, H, T, D)), q.new_empty((B, H, T), dtype=torch.float32)


@_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, dropout_p, seed):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _attn_setup(ctx, inputs, output):
    q, k, v, dropout_p, seed = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.dropout_p = dropout_p
    ctx.save_for_backward(q, k, v, o, lse, seed)


def _attn_backward(ctx, do, _dlse):
    q, k, v, o, lse, seed = ctx.saved_tensors
    dq, dk, dv = _attn_bwd_op(do, q, k, v, o, lse, ctx.dropout_p, seed)
    return dq, dk, dv, None, None


_attn_op.register_autograd(_attn_backward, setup_context=_attn_setup)


def flash_attention(q, k, v, dropout_p: float = 0.0, seed: torch.Tensor | None = None):
    """Causal attention, softmax scale 1/sqrt(head_dim). q, k, v: (B, n_head, T, head_dim).

    dropout_p > 0 drops attention probabilities in-kernel; the seed (a 1-element int64 tensor on the
    inputs' device) is drawn from torch's RNG unless given.
    """
    _check_qkv(q, k, v)
    _check_dropout(dropout_p)
    if dropout_p > 0.0 and seed is None:
        seed = new_seed(q.device)
    if seed is None:
        seed = torch.zeros(1, dtype=torch.int64, device=q.device)  # unused without dropout
    o, _ = _attn_op(q, k, v, float(dropout_p), seed)
    return o


def flash_attention_reference(q, k, v, dropout_p: float = 0.0, keep: torch.Tensor | None = None):
    """Plain PyTorch causal attention materializing T x T (for tests). `keep`: the dropout mask to apply."""
    T, D = q.shape[-2], q.shape[-1]
    s = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
    if dropout_p > 0.0:
        if keep is None:
            raise ValueError("flash_attention_reference: dropout_p > 0 needs the keep mask (see dropout_mask).")
        p = p * keep / (1.0 - dropout_p)
    return p @ v
