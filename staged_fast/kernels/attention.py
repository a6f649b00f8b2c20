"""Causal flash attention (forward and backward) in Triton, with optional in-kernel dropout.

    O = dropout(softmax(Q K^T / sqrt(hs) + causal mask)) V        Q, O: (B, nh, T, hs); K, V: (B, n_kv, T, hs)

Grouped-query attention: n_kv divides nh and kv head j serves query heads j*r .. j*r+r-1 (r = nh / n_kv;
n_kv = nh is plain multi-head attention). K and V are read in place with their own strides, never
repeated: the forward program of query head h reads kv head h // r; the backward runs one program per
(key block, kv head) that loops over its r query heads, summing their dK, dV in its registers (no
atomics, no per-query-head dK/dV buffers; dQ stays per query head). dK, dV come out with K's shape.

Forward (FlashAttention-2): one program per (BLOCK_M query rows, batch*head), heaviest (last) query
blocks first. It streams key/value blocks, keeps the running max m and sum l of the softmax in fp32
(online softmax, base-2 exponent, the 1/sqrt(hs) * log2(e) scale folded into one FMA), and saves
lse = m + log2(l) per row (B*nh*T fp32, log2 units). No T x T matrix ever exists in memory.
Key blocks strictly below the diagonal are always inside the sequence, so they run with no mask at
all (no causal mask, no bounds mask); only the diagonal blocks (BLOCK_M % BLOCK_N == 0) apply the
causal mask, and only the query block's own load/store of Q, O, lse checks the tail, so any T works.

Backward (FlashAttention-2, 5 GEMMs per tile), after one small prep kernel that writes
delta = rowsum(dO * O) (fp32) and zeroes the fp32 dQ accumulator:
one program per (BLOCK_N key block, batch*kv head) holds K, V and the fp32 dK, dV accumulators and, for
each query head of its group, walks the query blocks at or after its diagonal. Per tile it recomputes
S^T = K Q^T, P^T = exp2(S^T - lse), then dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta),
dK += dS^T Q and dQ_tile = dS K, which is atomically added (fp32, relaxed) into the dQ accumulator;
fp16/bf16 dQ is one cast at the end (fp32 inputs accumulate straight into dq). Tiles are split three
ways: the diagonal query blocks (causal + bounds masks), the full interior blocks (no masks at all),
and the one partial tail block (bounds only).
Why atomics, not a separate dQ kernel: the separate kernel must recompute S and dP, i.e. 7 GEMMs per
tile instead of 5 (+40% tensor-core work) and a second pass over K, V, Q, dO; the atomics cost
BLOCK_M x hs fp32 reductions into L2 per tile, i.e. 1/BLOCK_N of the tile's MMA work (BLOCK_N 64-128),
which is what FlashAttention-2's own CUDA backward does. Price: dQ is not bitwise deterministic on the
GPU (the order of the fp32 atomic adds varies); dK, dV are. The autotuner re-runs the kernel while
benchmarking, so the accumulator is declared `reset_to_zero` and the dropout seed is read from a tensor.
Split mode (`DQ_MODE = "split"`, STAGED_FAST_ATTN_DQ=split, and always under
torch.use_deterministic_algorithms(True), i.e. `--deterministic`): the same kernel without GEMM 5 and its
atomics gives dK, dV, then a dQ kernel shaped like the forward (one program per query block and query
head, key blocks up to the diagonal) recomputes P and dP and accumulates dQ = dS K in registers (3 GEMMs a
tile, 7 in all) and stores it once, in q's dtype: the same bits on every run, at the price of the two
recomputed GEMMs; `bench_kernels.py --only attention_dq` times the two modes side by side.

Autotuning: `triton.autotune` keyed on (T bucket = next power of two of T, head_dim, dropout flag, and
for the backward the GQA group r, which sets its program count and length; the autotuner also keys on
the tensors' dtypes), so a training run tunes once per (shape, dtype) and variable-length sampling does
not re-tune at every T. GPU config sets (BLOCK_M, BLOCK_N, warps, stages), checked offline with ptxas
for sm_90 (bf16, head_dim 64/96/128: the backward ones are spill-free or nearly so at 64/128, while
BLOCK_N 128 with only 4 warps spilled heavily and was dropped):
forward  (128,64,8,3) (128,128,8,3) (128,64,4,3) (128,32,4,3) (64,64,4,3) (64,32,4,4);
backward (32,128,8,3) (32,128,8,2) (16,64,8,2) (16,128,8,3) (64,64,8,3) (16,64,4,3).
Configs whose own tile is taller than max(64, T bucket) are pruned, and so is the forward 128x128/s3 at
head_dim 128 with dropout, which needs 240 KiB of shared memory (sm_90 allows 227; compile_check.py).
fp32 inputs (exact FMA dots by default; TF32 under --tf32) get a single config, forward (32,32,4,2) and
backward (16,32,4,2): larger fp32 tiles only spill and take up to a minute to compile (exact dots; TF32
tiles are not tuned: no GPU has timed them). `AUTOTUNE = False` (or
STAGED_FAST_ATTN_AUTOTUNE=0, or deterministic algorithms) runs the first config of each set without
timing (GPU tests use it to keep compiles few); it applies to keys not tuned yet.
Under TRITON_INTERPRET=1 (no GPU to benchmark on) exactly one small config runs: forward 32x16,
backward 16x32, which still reaches interior, diagonal and tail tiles at T of a few dozen.

head_dim (16, 32, 64, 96, 128) is a constexpr. 96 is not padded to 128: its columns are split into a
64-wide and a 32-wide block (D0 = 64, D1 = 32): two loads per operand, Q K^T as two chained dots into
one accumulator, and two accumulators each for O, dK, dV and two dQ atomic tiles; every dot keeps
K, N >= 16, so no padded lane is ever loaded or multiplied (padding to 128 wasted 25% of the MMAs).

Dropout (p > 0): 8-bit thresholds, 16 decisions per Philox call. With seed the call's one 64-bit
seed (Philox4x32-10 key = seed's low/high 32 bits), key column j of query row i of flattened query
head bh = b*nh + h (the query head, also under GQA) belongs to group g = j // 16 and uses
    (r0, r1, r2, r3) = philox(key = seed, counter = (g, i, bh, 0)),   w = (j % 16) // 4,   k = j % 4
    keep(b, h, i, j) = ((r_w >> 8k) & 0xFF) >= t,     t = min(255, round(p * 256)).
So every (seed, b, h, i, g) has its own counter, and different seeds are different keys: no two heads,
rows or calls share a stream (the old `seed + b*nh + h` streams overlapped across seeds). The kept
probabilities are scaled by 1/(1 - p_eff) with p_eff = t / 256 (`effective_dropout_p`; e.g. p = 0.1
-> t = 26, p_eff = 0.1015625; p < 1/512 gives t = 0, no dropout), which makes the expectation exact.
The mask is built per (BLOCK_M, BLOCK_N) tile (Philox on (BLOCK_M, BLOCK_N/16) counters, words and bytes
spread by join/reshape); the backward, which works on transposed tiles, transposes it. The forward folds that scale into
its final 1/l, the backward into dV's final scale and into dS. `dropout_mask` materializes exactly the
kernels' mask (same jit function); `flash_attention_reference(..., keep=mask)` reproduces the kernel.
The seed is drawn from torch's RNG on the inputs' device (`new_seed`), so runs are reproducible under
`torch.manual_seed` (the mask differs from SDPA's). The row sum l is taken before dropout: dropout
rescales the normalized probabilities, as in torch.

dtypes: fp16/bf16 (dots on tensor cores, fp32 accumulation) and fp32 (exact "ieee" dots, or TF32 when
torch's fp32 matmul precision allows it: the trainer's --tf32, _common.dot_precision);
lse, delta and the dQ accumulator are fp32. Under TRITON_INTERPRET=1 all operands are loaded as fp32
(UPCAST) because the interpreter's bf16 dot is wrong.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import FLASH_HEAD_DIMS, check_dq_mode, launch_through_ops
from ._common import (INTERPRETED, TunedLaunch, autotuning, cdiv, check_device, check_dtype, dot_precision, env_switch,
                      new_empty, next_power_of_2)

HEAD_DIMS = FLASH_HEAD_DIMS  # 96 runs as a 64-wide plus a 32-wide column block (no padding)
LOG2E = 1.4426950408889634
_DROP_GROUP = 16  # key columns per Philox call (4 words x 4 bytes)


def dropout_threshold(dropout_p: float) -> int:
    """The 8-bit threshold t: an element is kept when its random byte is >= t (so p_eff = t / 256)."""
    return min(255, int(dropout_p * 256.0 + 0.5))


def effective_dropout_p(dropout_p: float) -> float:
    """The drop probability the kernels actually apply: round(p * 256) / 256 (at most 255/256)."""
    return dropout_threshold(dropout_p) / 256.0


def _split_head_dim(head_dim: int) -> tuple[int, int]:
    """(D0, D1): power-of-two column blocks that tile head_dim exactly (D1 = 0: a single block)."""
    return (64, 32) if head_dim == 96 else (head_dim, 0)


# ---- Triton helpers ----


@triton.jit
def _keep_mask(seed, bh, offs_m, start_n, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dropout keep mask (BLOCK_M, BLOCK_N) for rows offs_m and key columns start_n + [0, BLOCK_N).

    start_n must be a multiple of 16. One Philox4x32 call per (row, 16-column group): counter
    (group, row, bh, 0), key = seed; column 16g + 4w + k uses byte k of output word w.
    """
    grp = start_n // 16 + tl.arange(0, BLOCK_N // 16)
    zero = tl.zeros([BLOCK_M, BLOCK_N // 16], dtype=tl.uint32)
    c0 = zero + grp[None, :].to(tl.uint32)
    c1 = zero + offs_m[:, None].to(tl.uint32)
    c2 = zero + bh.to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, zero)
    # (BLOCK_M, groups, 2, 2) with [..., a, b] = r_{2a+b}, flattened: word w of group g at column 4g + w.
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N // 4))
    u = tl.reshape(tl.broadcast_to(words[:, :, None], (BLOCK_M, BLOCK_N // 4, 4)), (BLOCK_M, BLOCK_N))
    shift = ((tl.arange(0, BLOCK_N) % 4) * 8).to(tl.uint32)
    return ((u >> shift[None, :]) & 0xFF).to(tl.int32) >= threshold


@triton.jit
def _load_rows(ptr, offs, stride, T, D0: tl.constexpr, D1: tl.constexpr, BOUNDS: tl.constexpr, UPCAST: tl.constexpr):
    """Rows `offs` of a (T, D0 + D1) matrix as two column blocks; rows >= T read as 0 when BOUNDS.
    With D1 == 0 the second block is a placeholder (the first), never used."""
    cols0 = tl.arange(0, D0)
    ptrs0 = ptr + offs[:, None] * stride + cols0[None, :]
    if BOUNDS:
        x0 = tl.load(ptrs0, mask=offs[:, None] < T, other=0.0)
    else:
        x0 = tl.load(ptrs0)
    if UPCAST:
        x0 = x0.to(tl.float32)
    x1 = x0
    if D1 > 0:
        cols1 = tl.arange(0, D1)
        ptrs1 = ptr + D0 + offs[:, None] * stride + cols1[None, :]
        if BOUNDS:
            x1 = tl.load(ptrs1, mask=offs[:, None] < T, other=0.0)
        else:
            x1 = tl.load(ptrs1)
        if UPCAST:
            x1 = x1.to(tl.float32)
    return x0, x1


@triton.jit
def _zero_blocks(ROWS: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """fp32 accumulators for the two column blocks; with D1 == 0 the second is a placeholder, never used."""
    x0 = tl.zeros([ROWS, D0], dtype=tl.float32)
    if D1 > 0:
        x1 = tl.zeros([ROWS, D1], dtype=tl.float32)
    else:
        x1 = tl.zeros([ROWS, 16], dtype=tl.float32)
    return x0, x1


@triton.jit
def _store_rows(ptr, offs, stride, T, x0, x1, D0: tl.constexpr, D1: tl.constexpr):
    cols0 = tl.arange(0, D0)
    tl.store(ptr + offs[:, None] * stride + cols0[None, :], x0.to(ptr.dtype.element_ty), mask=offs[:, None] < T)
    if D1 > 0:
        cols1 = tl.arange(0, D1)
        tl.store(ptr + D0 + offs[:, None] * stride + cols1[None, :], x1.to(ptr.dtype.element_ty), mask=offs[:, None] < T)


# ---- forward ----


@triton.jit
def _attn_fwd_tile(
    acc0, acc1, l_i, m_i, q0, q1, K_ptr, V_ptr, stride_kn, stride_vn, offs_m, start_n, T,
    qk_scale, seed, bh, threshold,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    # Interior tiles (CAUSAL False) lie wholly below the diagonal, hence inside the sequence: no masks.
    k0, k1 = _load_rows(K_ptr, offs_n, stride_kn, T, D0, D1, CAUSAL, UPCAST)
    s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
    if D1 > 0:
        s = tl.dot(q1, tl.trans(k1), s, input_precision=PRECISION)
    if CAUSAL:  # keys past T are > every row < T, so the causal mask covers the tail too
        s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc0 = acc0 * alpha[:, None]
    if D1 > 0:
        acc1 = acc1 * alpha[:, None]
    if DROPOUT:  # 1/(1 - p_eff) is applied once at the end
        p = tl.where(_keep_mask(seed, bh, offs_m, start_n, threshold, BLOCK_M, BLOCK_N), p, 0.0)
    v0, v1 = _load_rows(V_ptr, offs_n, stride_vn, T, D0, D1, CAUSAL, UPCAST)
    p = p.to(v0.dtype)
    acc0 = tl.dot(p, v0, acc0, input_precision=PRECISION)
    if D1 > 0:
        acc1 = tl.dot(p, v1, acc1, input_precision=PRECISION)
    return acc0, acc1, l_i, m_new


# GPU config sets, (BLOCK_M, BLOCK_N, num_warps, num_stages); the first is the default (AUTOTUNE off).
# Forward tiles need BLOCK_M % BLOCK_N == 0, backward tiles BLOCK_N % BLOCK_M == 0. fp32 inputs (exact
# "ieee" FMA dots, or TF32 under --tf32) get one small config: bigger fp32 tiles only spill and compile slowly.
_FWD_SHAPES = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4)]
# Backward: (16, 64, 8, 2) replaced (64, 128, 8, 2), which spilled the most at head_dim 96 and 128 when
# compiled for sm_90a as GPT-2 launches it (52-276 bytes under Triton 3.6; 16x64/w8/s2: none;
# benchmarks/kernel_resources.py --kernel attention, RESULTS.md).
_BWD_SHAPES = [(32, 128, 8, 3), (32, 128, 8, 2), (16, 64, 8, 2), (16, 128, 8, 3), (64, 64, 8, 3), (16, 64, 4, 3)]
# Split mode's dQ kernel (BLOCK_M % BLOCK_N == 0, like the forward); fp32 and the interpreter reuse the
# forward's single configs. Compiled for sm_90a (compile_check.py --ptxas, bf16): none spills at head_dim
# 64/96/128; 128x32 with 4 warps, dropped, spilled 108 B at 96 and 304 B at 128.
_DQ_SHAPES = [(128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)]
_FWD_FP32, _BWD_FP32 = (32, 32, 4, 2), (16, 32, 4, 2)
_INTERPRETER_FWD, _INTERPRETER_BWD = (32, 16, 4, 1), (16, 32, 4, 1)

# Autotuning on (default) or off (each kernel runs its default config: quick compiles, e.g. for GPU tests).
# Read at each launch whose key is new to the autotuner; set STAGED_FAST_ATTN_AUTOTUNE=0 or assign here.
AUTOTUNE = env_switch("STAGED_FAST_ATTN_AUTOTUNE")

# How the backward computes dQ: "atomic" (default: fp32 atomic adds from the dK/dV kernel, 5 GEMMs per
# tile, dQ bits vary from run to run on a GPU) or "split" (a second kernel, 7 GEMMs per tile in all, no
# atomics: the same bits every run). torch.use_deterministic_algorithms(True) selects "split" whatever
# this says. Set STAGED_FAST_ATTN_DQ=split, or assign here; read at each backward.
DQ_MODE = os.environ.get("STAGED_FAST_ATTN_DQ", "atomic")


def dq_mode() -> str:
    """The dQ mode the next backward runs: "split" under torch.use_deterministic_algorithms(True),
    else DQ_MODE."""
    return "split" if torch.are_deterministic_algorithms_enabled() else check_dq_mode(DQ_MODE)


def _configs(shapes, fp32_shape, interpreter_shape):
    """The GPU configs, fp32's last; under the interpreter (no GPU to benchmark on) one small config."""
    shapes = [interpreter_shape] if INTERPRETED else shapes + [fp32_shape]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _fwd_does_not_fit(config, args) -> bool:
    """Forward configs not worth a compile at this key, measured by compiling for sm_90a:
    - 128x128/s3 at head_dim 128 with dropout needs 240 KiB of shared memory, over sm_90's 227
      (benchmarks/compile_check.py): it would compile and then fail to load;
    - 128x64 on 4 warps holds 128 fp32 accumulator columns per thread at head_dim 128 and spills 252-720
      bytes there, 120-324 at head_dim 96 with dropout (benchmarks/kernel_resources.py, Triton 3.6 and 3.8);
      128x64 on 8 warps and 128x32 on 4 hold the same tiles without spilling."""
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    head_dim, dropout = args.get("HEAD_DIM", 0), bool(args.get("DROPOUT"))
    over_shared = dropout and head_dim > 96 and m * n >= 128 * 128 and config.num_stages >= 3
    spills = (m, n, config.num_warps) == (128, 64, 4) and (head_dim > 96 or (dropout and head_dim > 64))
    return over_shared or spills


def _prune(block: str, too_big=None):
    """fp32 inputs: their one config (the last). 16-bit: the others whose `block` (the program's own
    tile height) is at most max(64, T bucket) and that `too_big(config, args)` does not reject; only
    the first (the default) when AUTOTUNE is off or deterministic algorithms are on (`autotuning`)."""

    def prune(configs, named_args, **kwargs):
        if len(configs) == 1:
            return list(configs)
        args = {**named_args, **kwargs}
        if getattr(args.get("Q"), "dtype", None) == torch.float32:
            return [configs[-1]]
        kept = list(configs[:-1])
        t_key = args.get("T_KEY")
        if t_key is not None:
            kept = [c for c in kept if c.kwargs[block] <= max(64, t_key)] or kept
        if too_big is not None:
            kept = [c for c in kept if not too_big(c, args)] or kept
        return kept if autotuning(AUTOTUNE) else kept[:1]

    return prune


@triton.autotune(configs=_configs(_FWD_SHAPES, _FWD_FP32, _INTERPRETER_FWD), key=["T_KEY", "HEAD_DIM", "DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune("BLOCK_M", _fwd_does_not_fit)})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, Seed,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    H, GROUP, T, T_KEY, qk_scale, out_scale, threshold,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tl.static_assert(D0 + D1 == HEAD_DIM)
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first: better tail balance
    bh = tl.program_id(1)  # query head; dropout and O, lse are keyed by it
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    off_hkv = off_h // GROUP  # GQA: K, V have H / GROUP heads, read in place
    K_ptr = K + off_b * stride_kb + off_hkv * stride_kh
    V_ptr = V + off_b * stride_vb + off_hkv * stride_vh
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q0, q1 = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qm, T, D0, D1, True, UPCAST)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0, acc1 = _zero_blocks(BLOCK_M, D0, D1)
    for start_n in range(0, start_m, BLOCK_N):  # strictly below the diagonal: mask-free
        acc0, acc1, l_i, m_i = _attn_fwd_tile(
            acc0, acc1, l_i, m_i, q0, q1, K_ptr, V_ptr, stride_kn, stride_vn, offs_m, start_n, T,
            qk_scale, seed, bh, threshold,
            False, DROPOUT, UPCAST, PRECISION, BLOCK_M, BLOCK_N, D0, D1,
        )
    for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):  # diagonal blocks
        acc0, acc1, l_i, m_i = _attn_fwd_tile(
            acc0, acc1, l_i, m_i, q0, q1, K_ptr, V_ptr, stride_kn, stride_vn, offs_m, start_n, T,
            qk_scale, seed, bh, threshold,
            True, DROPOUT, UPCAST, PRECISION, BLOCK_M, BLOCK_N, D0, D1,
        )
    scale = out_scale / l_i  # out_scale = 1/(1 - p_eff)
    O_ptr = O + bh.to(tl.int64) * T * HEAD_DIM
    _store_rows(O_ptr, offs_m, HEAD_DIM, T, acc0 * scale[:, None], acc1 * scale[:, None], D0, D1)
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)


# ---- backward ----


@triton.jit
def _attn_bwd_prep_kernel(
    O, DO, Delta, DQ, stride_dob, stride_doh, stride_dom, H, T, delta_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr, ZERO_DQ: tl.constexpr,
):
    """delta[i] = (1 - p_eff) * sum_d dO[i, d] * O[i, d] (fp32), and (ZERO_DQ) zero the fp32 dQ
    accumulator rows. O and DQ are contiguous (B, nh, T, hs); dO may be strided."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    base = bh.to(tl.int64) * T * HEAD_DIM
    o0, o1 = _load_rows(O + base, offs_m, HEAD_DIM, T, D0, D1, True, True)
    do0, do1 = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_dom, T, D0, D1, True, True)
    delta = tl.sum(o0 * do0, axis=1)
    if D1 > 0:
        delta += tl.sum(o1 * do1, axis=1)
    tl.store(Delta + bh.to(tl.int64) * T + offs_m, delta * delta_scale, mask=offs_m < T)
    if ZERO_DQ:
        _store_rows(DQ + base, offs_m, HEAD_DIM, T, tl.zeros_like(o0), tl.zeros_like(o1), D0, D1)


@triton.jit
def _atomic_add_rows(ptrs, x, offs_m, T, BOUNDS: tl.constexpr):
    if BOUNDS:
        tl.atomic_add(ptrs, x, mask=offs_m[:, None] < T, sem="relaxed")
    else:
        tl.atomic_add(ptrs, x, sem="relaxed")


@triton.jit
def _attn_bwd_tile(
    dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q_ptr, DO_ptr, DQ_ptr, LSE_ptr, Delta_ptr, stride_qm, stride_dom,
    offs_n, start_n, start_m, T, qk_scale, ds_scale, seed, bh, threshold,
    CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    DQ_ATOMIC: tl.constexpr,
):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q0, q1 = _load_rows(Q_ptr, offs_m, stride_qm, T, D0, D1, BOUNDS, UPCAST)
    do0, do1 = _load_rows(DO_ptr, offs_m, stride_dom, T, D0, D1, BOUNDS, UPCAST)
    # Rows past T load q = dO = lse = delta = 0: their p is finite and dP - delta = 0, so they add nothing.
    if BOUNDS:
        lse = tl.load(LSE_ptr + offs_m, mask=offs_m < T, other=0.0)
        delta = tl.load(Delta_ptr + offs_m, mask=offs_m < T, other=0.0)
    else:
        lse = tl.load(LSE_ptr + offs_m)
        delta = tl.load(Delta_ptr + offs_m)
    sT = tl.dot(k0, tl.trans(q0), input_precision=PRECISION)  # (N, M)                     GEMM 1
    if D1 > 0:
        sT = tl.dot(k1, tl.trans(q1), sT, input_precision=PRECISION)
    pT = tl.math.exp2(sT * qk_scale - lse[None, :])
    if CAUSAL:
        pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
    dpT = tl.dot(v0, tl.trans(do0), input_precision=PRECISION)  # (N, M) = (dO V^T)^T      GEMM 3
    if D1 > 0:
        dpT = tl.dot(v1, tl.trans(do1), dpT, input_precision=PRECISION)
    if DROPOUT:
        keepT = tl.trans(_keep_mask(seed, bh, offs_m, start_n, threshold, BLOCK_M, BLOCK_N))
        pdT = tl.where(keepT, pT, 0.0)
        dpT = tl.where(keepT, dpT, 0.0)
    else:
        pdT = pT
    pdT = pdT.to(do0.dtype)
    dv0 = tl.dot(pdT, do0, dv0, input_precision=PRECISION)  #                                GEMM 2
    if D1 > 0:
        dv1 = tl.dot(pdT, do1, dv1, input_precision=PRECISION)
    # dS = P (dP_dropped - delta) / sqrt(hs) with dP_dropped = keep dP / (1 - p_eff); delta arrives
    # pre-multiplied by (1 - p_eff) and ds_scale = 1 / ((1 - p_eff) sqrt(hs)).
    dsT = (pT * (dpT - delta[None, :]) * ds_scale).to(q0.dtype)
    dk0 = tl.dot(dsT, q0, dk0, input_precision=PRECISION)  #                                 GEMM 4
    if D1 > 0:
        dk1 = tl.dot(dsT, q1, dk1, input_precision=PRECISION)
    if DQ_ATOMIC:  # else the dQ kernel computes dQ (split mode)
        ds = tl.trans(dsT)
        dq_rows = DQ_ptr + offs_m[:, None] * (D0 + D1)  # the fp32 accumulator is contiguous (T, hs) per head
        dq0 = tl.dot(ds, k0, input_precision=PRECISION)  # (M, D0)                          GEMM 5
        _atomic_add_rows(dq_rows + tl.arange(0, D0)[None, :], dq0, offs_m, T, BOUNDS)
        if D1 > 0:
            dq1 = tl.dot(ds, k1, input_precision=PRECISION)
            _atomic_add_rows(dq_rows + D0 + tl.arange(0, D1)[None, :], dq1, offs_m, T, BOUNDS)
    return dk0, dk1, dv0, dv1


@triton.autotune(configs=_configs(_BWD_SHAPES, _BWD_FP32, _INTERPRETER_BWD),
                 key=["T_KEY", "HEAD_DIM", "DROPOUT", "GROUP", "DQ_ATOMIC"],
                 reset_to_zero=["DQ"], prune_configs_by={"early_config_prune": _prune("BLOCK_N")})
@triton.jit
def _attn_bwd_kernel(
    Q, K, V, DO, LSE, Delta, DQ, DK, DV, Seed,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    H, GROUP: tl.constexpr, T, T_KEY, qk_scale, ds_scale, dv_scale, threshold,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, DQ_ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of one key block of one kv head (stored) and, with DQ_ATOMIC, the dQ contributions of its
    GROUP query heads (atomically added to the fp32 DQ; without it, DQ is not touched).

    GQA: the program loops over the GROUP query heads that share its kv head and sums their dK, dV in
    the same registers, so K, V are loaded once, no atomics and no per-query-head dK/dV buffer are
    needed, and dK, dV stay deterministic (the alternatives: fp32 atomics into dK/dV, or (B, nh, T, hs)
    temporaries reduced afterwards). The price is GROUP times fewer, longer programs, which matters only
    when B * n_kv * T / BLOCK_N is below the SM count. GROUP == 1 is the plain MHA kernel, op for op.
    GROUP is a constant of the compile (a model has one; it is in the autotuner's key anyway): compiled for
    sm_90a, the llama block's (group 3) atomic backward spilled 80 bytes with GROUP a runtime argument."""
    tl.static_assert(D0 + D1 == HEAD_DIM)
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    pid_n = tl.program_id(0)
    bhkv = tl.program_id(1)
    H_KV = H // GROUP
    off_b = bhkv // H_KV
    off_hkv = bhkv % H_KV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k0, k1 = _load_rows(K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh,
                        offs_n, stride_kn, T, D0, D1, True, UPCAST)
    v0, v1 = _load_rows(V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh,
                        offs_n, stride_vn, T, D0, D1, True, UPCAST)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    dk0, dk1 = _zero_blocks(BLOCK_N, D0, D1)
    dv0, dv1 = _zero_blocks(BLOCK_N, D0, D1)
    t_full = (T // BLOCK_M) * BLOCK_M
    for g in range(GROUP):
        off_h = off_hkv * GROUP + g  # the query head: it keys Q, dO, lse, delta, dQ and the dropout mask
        bh = off_b * H + off_h
        Q_ptr = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        DO_ptr = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
        DQ_ptr = DQ + bh.to(tl.int64) * T * HEAD_DIM
        LSE_ptr = LSE + bh.to(tl.int64) * T
        Delta_ptr = Delta + bh.to(tl.int64) * T
        # 1. Query blocks on this key block's diagonal (BLOCK_N % BLOCK_M == 0): causal and bounds masks.
        for start_m in range(start_n, tl.minimum(start_n + BLOCK_N, T), BLOCK_M):
            dk0, dk1, dv0, dv1 = _attn_bwd_tile(
                dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q_ptr, DO_ptr, DQ_ptr, LSE_ptr, Delta_ptr, stride_qm, stride_dom,
                offs_n, start_n, start_m, T, qk_scale, ds_scale, seed, bh, threshold,
                True, True, DROPOUT, UPCAST, PRECISION, BLOCK_M, BLOCK_N, D0, D1, DQ_ATOMIC,
            )
        # 2. Full query blocks strictly after the key block: no masks at all.
        for start_m in range(start_n + BLOCK_N, t_full, BLOCK_M):
            dk0, dk1, dv0, dv1 = _attn_bwd_tile(
                dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q_ptr, DO_ptr, DQ_ptr, LSE_ptr, Delta_ptr, stride_qm, stride_dom,
                offs_n, start_n, start_m, T, qk_scale, ds_scale, seed, bh, threshold,
                False, False, DROPOUT, UPCAST, PRECISION, BLOCK_M, BLOCK_N, D0, D1, DQ_ATOMIC,
            )
        # 3. The partial last query block, when it lies after the diagonal (runs 0 or 1 times): bounds only.
        for start_m in range(tl.maximum(t_full, start_n + BLOCK_N), T, BLOCK_M):
            dk0, dk1, dv0, dv1 = _attn_bwd_tile(
                dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q_ptr, DO_ptr, DQ_ptr, LSE_ptr, Delta_ptr, stride_qm, stride_dom,
                offs_n, start_n, start_m, T, qk_scale, ds_scale, seed, bh, threshold,
                False, True, DROPOUT, UPCAST, PRECISION, BLOCK_M, BLOCK_N, D0, D1, DQ_ATOMIC,
            )
    out = bhkv.to(tl.int64) * T * HEAD_DIM  # DK, DV: contiguous (B, n_kv, T, hs)
    _store_rows(DK + out, offs_n, HEAD_DIM, T, dk0, dk1, D0, D1)
    _store_rows(DV + out, offs_n, HEAD_DIM, T, dv0 * dv_scale, dv1 * dv_scale, D0, D1)


@triton.jit
def _attn_bwd_dq_tile(
    dq0, dq1, q0, q1, do0, do1, lse, delta, K_ptr, V_ptr, stride_kn, stride_vn, offs_m, start_n, T,
    qk_scale, ds_scale, seed, bh, threshold,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    # As in the forward: interior tiles (CAUSAL False) lie inside the sequence, so they load unmasked.
    k0, k1 = _load_rows(K_ptr, offs_n, stride_kn, T, D0, D1, CAUSAL, UPCAST)
    v0, v1 = _load_rows(V_ptr, offs_n, stride_vn, T, D0, D1, CAUSAL, UPCAST)
    s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)  # (M, N)                        GEMM 1
    if D1 > 0:
        s = tl.dot(q1, tl.trans(k1), s, input_precision=PRECISION)
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    if CAUSAL:
        p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
    dp = tl.dot(do0, tl.trans(v0), input_precision=PRECISION)  # (M, N)                      GEMM 2
    if D1 > 0:
        dp = tl.dot(do1, tl.trans(v1), dp, input_precision=PRECISION)
    if DROPOUT:
        dp = tl.where(_keep_mask(seed, bh, offs_m, start_n, threshold, BLOCK_M, BLOCK_N), dp, 0.0)
    ds = (p * (dp - delta[:, None]) * ds_scale).to(k0.dtype)  # as in _attn_bwd_tile
    dq0 = tl.dot(ds, k0, dq0, input_precision=PRECISION)  #                                   GEMM 3
    if D1 > 0:
        dq1 = tl.dot(ds, k1, dq1, input_precision=PRECISION)
    return dq0, dq1


@triton.autotune(configs=_configs(_DQ_SHAPES, _FWD_FP32, _INTERPRETER_FWD), key=["T_KEY", "HEAD_DIM", "DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune("BLOCK_M")})
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ, Seed,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    H, GROUP, T, T_KEY, qk_scale, ds_scale, threshold,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split mode's dQ: one program per (query block, query head) walks the key blocks up to its
    diagonal, as the forward does, recomputing P and dP (3 GEMMs per tile), and stores its dQ rows once:
    no atomics, so dQ is the same bits on every run."""
    tl.static_assert(D0 + D1 == HEAD_DIM)
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first, as in the forward
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    off_hkv = off_h // GROUP
    K_ptr = K + off_b * stride_kb + off_hkv * stride_kh
    V_ptr = V + off_b * stride_vb + off_hkv * stride_vh
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q0, q1 = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qm, T, D0, D1, True, UPCAST)
    do0, do1 = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_dom, T, D0, D1, True, UPCAST)
    # Rows past T load q = dO = lse = delta = 0: dP - delta = 0 there, so they add nothing (and are not stored).
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(Delta + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    dq0, dq1 = _zero_blocks(BLOCK_M, D0, D1)
    for start_n in range(0, start_m, BLOCK_N):  # strictly below the diagonal: mask-free
        dq0, dq1 = _attn_bwd_dq_tile(
            dq0, dq1, q0, q1, do0, do1, lse, delta, K_ptr, V_ptr, stride_kn, stride_vn, offs_m, start_n, T,
            qk_scale, ds_scale, seed, bh, threshold,
            False, DROPOUT, UPCAST, PRECISION, BLOCK_M, BLOCK_N, D0, D1,
        )
    for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):  # diagonal blocks
        dq0, dq1 = _attn_bwd_dq_tile(
            dq0, dq1, q0, q1, do0, do1, lse, delta, K_ptr, V_ptr, stride_kn, stride_vn, offs_m, start_n, T,
            qk_scale, ds_scale, seed, bh, threshold,
            True, DROPOUT, UPCAST, PRECISION, BLOCK_M, BLOCK_N, D0, D1,
        )
    _store_rows(DQ + bh.to(tl.int64) * T * HEAD_DIM, offs_m, HEAD_DIM, T, dq0, dq1, D0, D1)


@triton.jit
def _dropout_mask_kernel(Seed, Out, T, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep_mask(tl.load(Seed), bh, offs_m, pid_n * BLOCK_N, threshold, BLOCK_M, BLOCK_N)
    ptrs = Out + bh.to(tl.int64) * T * T + offs_m[:, None] * T + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < T) & (offs_n[None, :] < T))


# ---- host launchers ----


def _check_qkv(q, k, v):
    op = "flash_attention"
    check_device(op, q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dtype(op, t, name)
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be (B, n_head, T, head_dim), got shape {tuple(t.shape)}.")
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} needs a contiguous last (head_dim) dimension, got strides {t.stride()}.")
    same = k.shape == v.shape and q.shape[:1] + q.shape[2:] == k.shape[:1] + k.shape[2:]
    if not (same and q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"{op}: q, k, v must share shape and dtype (k and v may have fewer heads than q), got "
            f"{tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} and {q.dtype}/{k.dtype}/{v.dtype}."
        )
    n_head, n_kv = q.shape[1], k.shape[1]
    if (n_kv == 0 and n_head != 0) or (n_kv != 0 and n_head % n_kv != 0):
        raise ValueError(
            f"{op}: q has {n_head} heads, k and v have {n_kv}: grouped-query attention needs n_head to be a "
            f"multiple of n_kv_head (each k/v head serves n_head / n_kv_head query heads)."
        )
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(
            f"{op}: head_dim {q.shape[-1]} is not supported; supported: {HEAD_DIMS}. "
            f"Choose n_head so that n_embd / n_head is one of them, or use --kernels torch."
        )


def _check_dropout(dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"flash_attention: dropout_p must be in [0, 1), got {dropout_p}.")


def _check_seed(op: str, seed, device) -> None:
    if not (isinstance(seed, torch.Tensor) and seed.numel() >= 1 and seed.dtype == torch.int64 and seed.device == device):
        raise ValueError(f"{op}: dropout needs `seed`, an int64 tensor on {device} (see new_seed).")


def _t_key(T: int) -> int:
    return max(16, next_power_of_2(T))


def _group(q, k) -> int:
    """Query heads per k/v head (1 without GQA)."""
    return q.shape[1] // k.shape[1] if k.shape[1] else 1


def new_seed(device) -> torch.Tensor:
    """A dropout seed drawn from torch's RNG on `device` (reproducible under torch.manual_seed, no host sync)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def flash_attention_forward(q, k, v, dropout_p: float = 0.0, seed: torch.Tensor | None = None):
    """Launch the forward. q (B, nh, T, hs); k, v (B, n_kv, T, hs) with nh % n_kv == 0. Returns (o, lse):
    o (B, nh, T, hs) contiguous in q's dtype, lse (B, nh, T) fp32 in log2 units (lse2 = log2 sum_j
    exp2(s_ij), s in log2 units). `seed` is needed when dropout_p > 0."""
    _check_qkv(q, k, v)
    _check_dropout(dropout_p)
    if dropout_threshold(dropout_p) > 0:
        _check_seed("flash_attention_forward", seed, q.device)
    return _attn_fwd(q, k, v, dropout_p, seed)


def _attn_fwd(q, k, v, dropout_p, seed):
    """flash_attention_forward without its checks (done once by flash_attention)."""
    B, H, T, D = q.shape
    o = new_empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = new_empty((B, H, T), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    threshold = dropout_threshold(dropout_p)
    dropout = threshold > 0
    d0, d1 = _split_head_dim(D)
    grid = lambda meta: (cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    t_key, group = _t_key(T), _group(q, k)
    precision = dot_precision(q.dtype)
    _launch_fwd(  # the autotuner's key: T bucket, head_dim, dropout, the tensors' dtypes, fp32 dot precision
        grid, (t_key, D, dropout, q.dtype, precision),
        q, k, v, o, lse, seed if dropout else lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        H, group, T, t_key, LOG2E / math.sqrt(D), 1.0 / (1.0 - threshold / 256.0), threshold,
        HEAD_DIM=D, D0=d0, D1=d1, DROPOUT=dropout, UPCAST=INTERPRETED, PRECISION=precision,
    )
    return o, lse


def flash_attention_backward(do, q, k, v, o, lse, dropout_p: float = 0.0, seed: torch.Tensor | None = None):
    """Launch the backward: prep + one dK/dV/dQ kernel, or in split mode (`dq_mode`) prep + a dK/dV
    kernel + a dQ kernel. Returns (dq, dk, dv), contiguous, in q's dtype, dk and dv with k's head count.
    `o` and `lse` are the forward's outputs (o contiguous)."""
    _check_qkv(q, k, v)
    if do.shape != q.shape:
        raise ValueError(f"flash_attention_backward: grad shape {tuple(do.shape)} != {tuple(q.shape)}.")
    if dropout_threshold(dropout_p) > 0:
        _check_seed("flash_attention_backward", seed, q.device)
    return _attn_bwd(do, q, k, v, o, lse, dropout_p, seed)


def _attn_bwd(do, q, k, v, o, lse, dropout_p, seed):
    """flash_attention_backward without its checks: autograd hands it what the forward saved."""
    if do.stride(-1) != 1:
        do = do.contiguous()
    o = o.contiguous()
    B, H, T, D = q.shape
    atomic = dq_mode() == "atomic"
    # Atomic: an fp32 accumulator zeroed by the prep kernel (cast once at the end); split: dQ itself.
    dq_acc = new_empty((B, H, T, D), dtype=torch.float32 if atomic else q.dtype, device=q.device)
    H_kv = k.shape[1]
    dk = new_empty((B, H_kv, T, D), dtype=q.dtype, device=q.device)
    dv = new_empty((B, H_kv, T, D), dtype=q.dtype, device=q.device)
    if dk.numel() == 0:
        return dq_acc.to(q.dtype), dk, dv
    threshold = dropout_threshold(dropout_p)
    dropout = threshold > 0
    keep_frac = 1.0 - threshold / 256.0
    d0, d1 = _split_head_dim(D)
    delta = new_empty((B, H, T), dtype=torch.float32, device=q.device)
    _attn_bwd_prep_kernel[(cdiv(T, 64), B * H)](
        o, do, delta, dq_acc, do.stride(0), do.stride(1), do.stride(2), H, T, keep_frac,
        HEAD_DIM=D, D0=d0, D1=d1, BLOCK_M=64, ZERO_DQ=atomic,
    )
    # One program per (key block, kv head); it loops over the kv head's query heads (see the kernel).
    grid = lambda meta: (cdiv(T, meta["BLOCK_N"]), B * H_kv)  # noqa: E731
    t_key, group = _t_key(T), _group(q, k)
    qk_scale, ds_scale = LOG2E / math.sqrt(D), 1.0 / (keep_frac * math.sqrt(D))
    precision = dot_precision(q.dtype)
    _launch_bwd(  # the autotuner's key: T bucket, head_dim, dropout, GQA group, dQ mode, dtypes, fp32 precision
        grid, (t_key, D, dropout, group, atomic, q.dtype, do.dtype, precision),
        q, k, v, do, lse, delta, dq_acc, dk, dv, seed if dropout else lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, group, T, t_key, qk_scale, ds_scale, 1.0 / keep_frac, threshold,
        HEAD_DIM=D, D0=d0, D1=d1, DROPOUT=dropout, UPCAST=INTERPRETED, PRECISION=precision,
        DQ_ATOMIC=atomic,
    )
    if atomic:
        return dq_acc.to(q.dtype), dk, dv  # no copy for fp32 inputs
    dq_grid = lambda meta: (cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _launch_dq(  # the autotuner's key: T bucket, head_dim, dropout, the tensors' dtypes, fp32 precision
        dq_grid, (t_key, D, dropout, q.dtype, do.dtype, precision),
        q, k, v, do, lse, delta, dq_acc, seed if dropout else lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, group, T, t_key, qk_scale, ds_scale, threshold,
        HEAD_DIM=D, D0=d0, D1=d1, DROPOUT=dropout, UPCAST=INTERPRETED, PRECISION=precision,
    )
    return dq_acc, dk, dv


_launch_fwd, _launch_bwd = TunedLaunch(_attn_fwd_kernel), TunedLaunch(_attn_bwd_kernel)
_launch_dq = TunedLaunch(_attn_bwd_dq_kernel)


def dropout_mask(seed: torch.Tensor, B: int, H: int, T: int, dropout_p: float) -> torch.Tensor:
    """The (B, H, T, T) keep mask (bool) the kernels use for `seed` (tests and debugging only: O(T^2)).
    H is the number of query heads (under GQA too: the mask is keyed by the query head). Includes the
    entries above the diagonal, which the kernels never use."""
    out = torch.empty((B, H, T, T), dtype=torch.int8, device=seed.device)
    if out.numel():
        _dropout_mask_kernel[(cdiv(T, 32), cdiv(T, 32), B * H)](
            seed, out, T, dropout_threshold(dropout_p), BLOCK_M=32, BLOCK_N=32
        )
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
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape)


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


class _FlashAttentionFunction(torch.autograd.Function):
    """The eager path: the same launchers without the custom op's dispatch, whose host time exceeds the
    kernels' device time at GPT-2 sizes (measured on an H200, benchmarks/RESULTS.md). Compiled graphs
    use the torch.library op above."""

    @staticmethod
    def forward(ctx, q, k, v, dropout_p, seed):
        o, lse = _attn_fwd(q, k, v, dropout_p, seed)
        ctx.dropout_p = dropout_p
        ctx.save_for_backward(q, k, v, o, lse, seed)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seed = ctx.saved_tensors
        dq, dk, dv = _attn_bwd(do, q, k, v, o, lse, ctx.dropout_p, seed)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, dropout_p: float = 0.0, seed: torch.Tensor | None = None):
    """Causal attention, softmax scale 1/sqrt(head_dim). q: (B, n_head, T, head_dim); k, v: (B, n_kv_head,
    T, head_dim) with n_head % n_kv_head == 0 (grouped-query attention, kv head j serving query heads
    j*r .. j*r+r-1, r = n_head / n_kv_head; read in place, never repeated). dk, dv have k's shape.

    dropout_p > 0 drops attention probabilities in-kernel with p_eff = round(256 p) / 256 (see the module
    docstring); the seed (a 1-element int64 tensor on the inputs' device) is drawn from torch's RNG
    unless given.
    """
    _check_qkv(q, k, v)
    _check_dropout(dropout_p)
    if dropout_p > 0.0 and seed is None:
        seed = new_seed(q.device)
    if dropout_threshold(dropout_p) > 0:
        _check_seed("flash_attention", seed, q.device)
    if not launch_through_ops():
        return _FlashAttentionFunction.apply(q, k, v, float(dropout_p), seed)
    if seed is None:
        seed = torch.zeros(1, dtype=torch.int64, device=q.device)  # the op's schema needs one; unused
    o, _ = _attn_op(q, k, v, float(dropout_p), seed)
    return o


def flash_attention_reference(q, k, v, dropout_p: float = 0.0, keep: torch.Tensor | None = None):
    """Plain PyTorch causal attention materializing T x T (for tests). `keep`: the dropout mask to apply
    (from `dropout_mask`); kept probabilities are scaled by 1/(1 - p_eff), as in the kernels. k, v with
    fewer heads than q (GQA) are repeated here, for the reference only."""
    T, D = q.shape[-2], q.shape[-1]
    if k.shape[1] != q.shape[1]:
        r = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
    s = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
    if dropout_p > 0.0:
        if keep is None:
            raise ValueError("flash_attention_reference: dropout_p > 0 needs the keep mask (see dropout_mask).")
        p = p * keep / (1.0 - effective_dropout_p(dropout_p))
    return p @ v
