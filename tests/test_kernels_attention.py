"""Triton causal flash attention against a float64 reference, under the rule of tests/README.md.

Runs on CUDA when available (kernels compiled, bigger shapes, autotuning off except in its own test so
each (head_dim, dtype, dropout) compiles one config), else on CPU under TRITON_INTERPRET=1, where the
kernels run one 32x16 (forward) / 16x32 (backward) tile config: T 40 and 67 reach the interior (mask-free),
diagonal and tail tiles of both kernels, T 1 and 17 the single-block paths. Grouped-query attention
(k, v with fewer heads than q) runs the same kernels with r = 2, 3 and 4 query heads per kv head.
"""
import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

CUDA = torch.cuda.is_available()
# Without CUDA, tests/conftest.py has set TRITON_INTERPRET=1 before this module (and Triton) is imported.

from staged_fast.kernels import attention, causal_attention
from staged_fast.kernels._common import assert_within_torch_error, poisoned_outputs
from staged_fast.kernels.attention import (
    dropout_mask,
    dropout_threshold,
    effective_dropout_p,
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
    flash_attention_reference,
    new_seed,
)

DEVICE = "cuda" if CUDA else "cpu"
# (B, n_head, T, head_dim): T not a multiple of any block (but 1); head_dim 96 runs as 64 + 32 columns.
SHAPES = (
    [(2, 3, 1000, 64), (1, 4, 1500, 96), (2, 2, 513, 128), (1, 2, 37, 96), (2, 2, 1, 16)]
    if CUDA
    else [(2, 2, 1, 16), (2, 2, 17, 64), (1, 2, 40, 96), (1, 2, 67, 128), (2, 2, 67, 32)]
)
# atol per dtype (outputs are O(1) averages of values ~N(0,1)); see tests/README.md.
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
P_DROP = 0.1  # threshold 26/256: p_eff = 0.1015625
# On CPU every shape x dtype x dropout. On CUDA each (head_dim, dtype, dropout) is one compile of each
# kernel (several seconds), so fp16 and dropout run on the first two shapes only, dropout in fp32/bf16.
CASES = [(s, d, 0.0) for i, s in enumerate(SHAPES) for d in DTYPES if not CUDA or i < 2 or d != torch.float16] + [
    (s, d, P_DROP) for s in (SHAPES[:2] if CUDA else SHAPES) for d in DTYPES if not CUDA or d != torch.float16
]


@pytest.fixture(autouse=True)
def _one_config_per_kernel(monkeypatch):
    """GPU: no autotuning (each key would compile and time 6 configs); the autotune test turns it on."""
    monkeypatch.setattr(attention, "AUTOTUNE", False)


def _qkv(B, H, T, D, dtype, seed=0):
    """q, k, v laid out as the model makes them: views of one (B, T, 3, H, D) tensor (strided)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(B, T, 3, H, D, generator=g).to(DEVICE, dtype)
    return [t.transpose(1, 2).detach().requires_grad_() for t in qkv.unbind(2)]  # (B, H, T, D) views


def _seed(value):
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


def _check(q, k, v, dropout_p=0.0, seed=None, factor=2.0):
    dtype = q.dtype
    g = torch.Generator(device="cpu").manual_seed(7)
    do = torch.randn(q.shape, generator=g).to(DEVICE, dtype)
    keep = dropout_mask(seed, *q.shape[:3], dropout_p) if dropout_p > 0 else None
    with poisoned_outputs():
        o = flash_attention(q, k, v, dropout_p=dropout_p, seed=seed)
        grads = torch.autograd.grad(o, (q, k, v), do)
    o_torch = flash_attention_reference(q, k, v, dropout_p, keep)
    grads_torch = torch.autograd.grad(o_torch, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o_ref = flash_attention_reference(q64, k64, v64, dropout_p, keep)
    grads_ref = torch.autograd.grad(o_ref, (q64, k64, v64), do.double())
    assert o.dtype == dtype and o.shape == q.shape
    assert_within_torch_error(o, o_torch, o_ref, name="out", atol=ATOL[dtype], factor=factor)
    for name, d, t, r, x in zip(("dq", "dk", "dv"), grads, grads_torch, grads_ref, (q, k, v)):
        assert d.dtype == dtype and d.shape == x.shape  # GQA: dk, dv with k's (fewer) heads
        assert_within_torch_error(d, t, r, name=name, atol=2 * ATOL[dtype], factor=factor)
    return o, grads


def _case_id(case):
    shape, dtype, p = case
    return f"{'x'.join(map(str, shape))}-{str(dtype).split('.')[-1]}-p{p}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_flash_attention_matches_float64(case):
    """Forward and dq/dk/dv, no dropout and dropout 0.1 (the reference applies the kernel's own mask)."""
    shape, dtype, p = case
    _check(*_qkv(*shape, dtype, seed=1), dropout_p=p, seed=_seed(2**40 + 17) if p else None)


# ---- grouped-query attention (k, v with n_kv < n_head heads, read in place) ----

# (B, n_head, n_kv, T, head_dim): r = n_head / n_kv = 2, 3 and 4 (MQA); T 37 and 67 reach the tail and,
# at 67, the interior tiles of the backward too.
GQA_SHAPES = (
    [(2, 12, 4, 1000, 64), (1, 6, 2, 513, 96), (1, 6, 3, 37, 96)]
    if CUDA
    else [(1, 6, 3, 37, 96), (2, 6, 2, 37, 64), (1, 4, 1, 67, 32)]
)
GQA_CASES = [(s, d, p) for s in GQA_SHAPES for d in DTYPES for p in (0.0, P_DROP)]


def _qkv_gqa(B, H, H_kv, T, D, dtype, seed=0):
    """As llama makes them: q a (B, T, H, D) view, k and v views of one (B, T, 2, H_kv, D) tensor."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(DEVICE, dtype)
    kv = torch.randn(B, T, 2, H_kv, D, generator=g).to(DEVICE, dtype)
    return [t.transpose(1, 2).detach().requires_grad_() for t in (q, *kv.unbind(2))]


def _gqa_case_id(case):
    shape, dtype, p = case
    B, H, H_kv, T, D = shape
    return f"{B}x{H}/{H_kv}x{T}x{D}-{str(dtype).split('.')[-1]}-p{p}"


@pytest.mark.parametrize("case", GQA_CASES, ids=_gqa_case_id)
def test_gqa_matches_float64(case):
    """GQA forward and dq/dk/dv against the float64 reference on K/V repeated to n_head heads (the
    kernel never repeats them): dk, dv of kv head j are the sums over its r query heads."""
    shape, dtype, p = case
    _check(*_qkv_gqa(*shape, dtype, seed=6), dropout_p=p, seed=_seed(2**41 + 5) if p else None)


def test_gqa_equals_the_kernel_on_repeated_kv():
    """Query head h reads kv head h // r, and the dropout mask is still keyed by the query head: the
    output is bit-equal to the MHA kernel on K/V repeated by hand; the gradients equal the repeated
    run's, dk and dv summed over each group (fp32, so only the summation order differs)."""
    B, H, H_kv, T, D, p = 2, 6, 2, 45, 64, P_DROP
    q, k, v = _qkv_gqa(B, H, H_kv, T, D, torch.float32, seed=9)
    kr, vr = (t.detach().repeat_interleave(H // H_kv, dim=1).requires_grad_() for t in (k, v))
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    seed = _seed(4242)
    with poisoned_outputs():
        o = flash_attention(q, k, v, p, seed)
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
        o_rep = flash_attention(q, kr, vr, p, seed)
        dq_rep, dk_rep, dv_rep = torch.autograd.grad(o_rep, (q, kr, vr), do)
    assert torch.equal(o, o_rep)
    torch.testing.assert_close(dq, dq_rep, rtol=0, atol=1e-6)
    for d, d_rep in ((dk, dk_rep), (dv, dv_rep)):
        assert d.shape == (B, H_kv, T, D)
        torch.testing.assert_close(d, d_rep.view(B, H_kv, H // H_kv, T, D).sum(2), rtol=0, atol=1e-5)


def test_gqa_dispatch_keeps_kv_heads_and_matches_sdpa():
    """causal_attention(backend="triton") passes n_kv-head k, v straight to the kernel: dk, dv come back
    with k's shape (nothing repeated on the way), and output and gradients match SDPA's enable_gqa."""
    q, k, v = _qkv_gqa(2, 6, 2, 33, 64, torch.float32, seed=12)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    with poisoned_outputs():
        out = causal_attention(q, k, v, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), do)
    out_sdpa = causal_attention(q, k, v, backend="torch")
    grads_sdpa = torch.autograd.grad(out_sdpa, (q, k, v), do)
    assert [tuple(g.shape) for g in grads] == [(2, 6, 33, 64), (2, 2, 33, 64), (2, 2, 33, 64)]
    torch.testing.assert_close(out, out_sdpa, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_sdpa):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gqa_rejects_bad_head_ratios():
    q, k, v = _qkv_gqa(1, 6, 4, 16, 64, torch.float32)
    with pytest.raises(ValueError, match=r"q has 6 heads, k and v have 4: .* multiple of n_kv_head"):
        flash_attention(q, k, v)
    with pytest.raises(ValueError, match="q has 6 heads"):
        causal_attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="share shape and dtype"):  # k and v must agree with each other
        flash_attention(q, k[:, :3], v[:, :2])
    with pytest.raises(ValueError, match="share shape and dtype"):  # only the head count may differ
        flash_attention(q, k[:, :3, :8], v[:, :3, :8])


@pytest.mark.parametrize("dq_mode", ["atomic", "split"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_flash_attention_under_autocast(monkeypatch, dtype, dq_mode):
    """q, k, v made by a Linear under autocast (16-bit, strided), dropout on; the gradient reaches the
    Linear's fp32 weight and bias, through either dQ mode of the backward. Bound: 2x the error of the same
    pipeline with torch's attention."""
    monkeypatch.setattr(attention, "DQ_MODE", dq_mode)
    B, H, T, D, C = (2, 4, 300, 64, 256) if CUDA else (1, 2, 40, 64, 48)
    g = torch.Generator(device="cpu").manual_seed(3)
    x = torch.randn(B, T, C, generator=g).to(DEVICE)
    weight = (torch.randn(3 * H * D, C, generator=g) / C**0.5).to(DEVICE).requires_grad_()
    bias = (0.1 * torch.randn(3 * H * D, generator=g)).to(DEVICE).requires_grad_()
    do = torch.randn(B, H, T, D, generator=g).to(DEVICE)
    seed = _seed(99)
    keep = dropout_mask(seed, B, H, T, P_DROP)

    def run(attn, x, weight, bias, autocast):
        with torch.autocast(DEVICE, dtype=dtype) if autocast else contextlib.nullcontext():
            qkv = F.linear(x, weight, bias).view(B, T, 3, H, D)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
            o = attn(q, k, v)
        wide = o if o.dtype == torch.float64 else o.float()
        return o, torch.autograd.grad((wide * do.to(wide.dtype)).sum(), (weight, bias))

    with poisoned_outputs():
        o, grads = run(lambda q, k, v: flash_attention(q, k, v, P_DROP, seed), x, weight, bias, True)
    o_torch, grads_torch = run(lambda q, k, v: flash_attention_reference(q, k, v, P_DROP, keep), x, weight, bias, True)
    w64, b64 = (t.detach().double().requires_grad_() for t in (weight, bias))
    o_ref, grads_ref = run(lambda q, k, v: flash_attention_reference(q, k, v, P_DROP, keep), x.double(), w64, b64, False)
    assert o.dtype == dtype  # the kernel ran in the autocast dtype
    assert_within_torch_error(o, o_torch, o_ref, name="out", atol=ATOL[dtype])
    for name, d, t, r in zip(("dweight", "dbias"), grads, grads_torch, grads_ref):
        assert d.dtype == torch.float32
        assert_within_torch_error(d, t, r, name=name, atol=2 * ATOL[dtype] * r.abs().max().item())


# ---- dropout ----


def test_dropout_streams_do_not_overlap():
    """Regression (issue 9): with streams `seed + b*nh + h`, head h under seed s drew the same mask as
    head h+1 under seed s-1. Now every (seed, b, h) has its own stream: all head masks of two adjacent
    seeds are pairwise different, within a call and across the two calls."""
    B, H, T = 2, 3, 32
    s = _seed(1234)
    masks = torch.cat([dropout_mask(s + d, B, H, T, 0.5).reshape(B * H, T * T) for d in (0, 1)])
    same = (masks[:, None, :] == masks[None, :, :]).all(-1)
    pairs = [(i, j) for i, j in same.nonzero().tolist() if i < j]
    assert not pairs, f"identical head masks (index = seed offset * {B * H} + b * {H} + h): {pairs}"


def _philox4x32(seed, c0, c1, c2, c3, rounds=10):
    """Philox4x32-10 in numpy (Random123, as triton.language.philox), key = seed's low/high 32 bits."""
    m32, s32 = np.uint64(0xFFFFFFFF), np.uint64(32)
    c = [x.copy() for x in np.broadcast_arrays(*(np.asarray(x, dtype=np.uint64) for x in (c0, c1, c2, c3)))]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    mul_a, mul_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(rounds):
        pa, pb = mul_a * c[0], mul_b * c[2]  # exact: both factors < 2^32
        c = [((pb >> s32) ^ c[1] ^ k0) & m32, pb & m32, ((pa >> s32) ^ c[3] ^ k1) & m32, pa & m32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m32, (k1 + np.uint64(0xBB67AE85)) & m32
    return c


def test_dropout_mask_is_the_documented_philox_scheme():
    """keep(b,h,i,j) = byte j%4 of word (j%16)//4 of philox(seed, (j//16, i, b*nh+h, 0)) >= round(256 p):
    16 decisions per Philox call, the 64-bit seed as key (a seed above 2^32 checks the high word)."""
    B, H, T, p, seed = 2, 2, 37, 0.3, 2**40 + 12345
    mask = dropout_mask(_seed(seed), B, H, T, p).cpu().numpy().reshape(B * H, T, T)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    for bh in range(B * H):
        words = _philox4x32(seed, j // 16, i, bh, 0)
        word = np.choose(np.broadcast_to((j % 16) // 4, (T, T)), words)
        expect = ((word >> (8 * (j % 4)).astype(np.uint64)) & np.uint64(0xFF)) >= dropout_threshold(p)
        assert (mask[bh] == expect).all(), f"head {bh}: {(mask[bh] != expect).sum()} elements differ"


def test_dropout_rate_is_the_8bit_quantized_p():
    assert dropout_threshold(0.1) == 26 and effective_dropout_p(0.1) == 26 / 256
    assert dropout_threshold(0.5) == 128 and effective_dropout_p(0.5) == 0.5
    assert dropout_threshold(0.9999) == 255  # p_eff <= 255/256
    assert dropout_threshold(0.001) == 0  # below half a step: no dropout at all
    keep = dropout_mask(_seed(5), 2, 2, 96, 0.25).float().mean().item()  # 36864 draws: std ~0.0023
    assert abs(keep - (1 - effective_dropout_p(0.25))) < 0.012, keep
    q, k, v = _qkv(1, 2, 20, 16, torch.float32)
    assert torch.equal(flash_attention(q, k, v, dropout_p=0.001), flash_attention(q, k, v))


def test_flash_attention_dropout_reproducible_under_manual_seed():
    q, k, v = _qkv(1, 2, 40, 64, torch.float32)
    torch.manual_seed(123)
    o1 = flash_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(123)
    o2 = flash_attention(q, k, v, dropout_p=0.5)
    o3 = flash_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(o1, o2)
    assert not torch.equal(o1, o3)


# ---- launchers, ops, dispatch ----


def test_backward_launcher_matches_autograd():
    """flash_attention_forward/backward used directly (the API the custom ops wrap), with dropout."""
    q, k, v = _qkv(1, 2, 40, 96, torch.float32, seed=4)
    seed = _seed(77)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    o, lse = flash_attention_forward(q, k, v, 0.2, seed)
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    dq, dk, dv = flash_attention_backward(do, q, k, v, o, lse, 0.2, seed)
    ref = torch.autograd.grad(flash_attention(q, k, v, 0.2, seed), (q, k, v), do)
    for a, b in zip((dq, dk, dv), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("matmul_precision", ["highest", "high"])
def test_fp32_dots_follow_torchs_matmul_precision(monkeypatch, matmul_precision):
    """fp32 inputs: exact "ieee" dots by default, TF32 after set_float32_matmul_precision("high") (the
    trainer's --tf32), as torch's own fp32 matmuls; 16-bit inputs always take the tensor cores. The
    precision is part of each launch's autotune key, and the results stay within torch's own error of
    float64 at the same setting (the interpreter computes every dot exactly)."""
    seen = []

    def recording(launch):
        def call(grid, key, *args, **kwargs):
            seen.append((key, kwargs["PRECISION"], args[0].dtype))
            return launch(grid, key, *args, **kwargs)
        return call

    for name in ("_launch_fwd", "_launch_bwd", "_launch_dq"):
        monkeypatch.setattr(attention, name, recording(getattr(attention, name)))
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    try:  # within torch's own error, at its precision setting, of the float64 result
        # TF32 (tests/README.md): the backward's five TF32 dots against torch autograd's four matmuls
        _check(*_qkv(1, 2, 40, 96, torch.float32, seed=5), dropout_p=P_DROP, seed=_seed(3),
               factor=2.0 if matmul_precision == "highest" else 4.0)
        _check(*_qkv(1, 2, 40, 96, torch.bfloat16, seed=5))
    finally:
        torch.set_float32_matmul_precision(before)
    fp32 = "ieee" if matmul_precision == "highest" else "tf32"
    assert [(p, d) for _, p, d in seen] == [(fp32, torch.float32)] * 2 + [("tf32", torch.bfloat16)] * 2, seen
    assert all(key[-1] == p for key, p, _ in seen)  # the autotune key separates the precisions


@pytest.mark.skipif(not CUDA, reason="autotuning needs a GPU (the interpreter runs one config)")
def test_autotuned_configs_match_float64(monkeypatch):
    """With autotuning on, the kernels run (and re-run while timing) several configs; the dQ atomics
    start from zero again (reset_to_zero) and the dropout seed is read from a tensor, so the result
    still matches. The launchers' and the autotuners' tables are emptied, so this key is tuned here even
    where another test ran it untuned (the autocast test's T = 300 did)."""
    monkeypatch.setattr(attention, "AUTOTUNE", True)
    for launch in (attention._launch_fwd, attention._launch_bwd):
        monkeypatch.setattr(launch, "_chosen", {})
        monkeypatch.setattr(launch.autotuned, "cache", {})
    timed = []
    for launch in (attention._launch_fwd, attention._launch_bwd):
        real = launch.autotuned._bench
        monkeypatch.setattr(launch.autotuned, "_bench",
                            lambda *a, _real=real, **kw: timed.append(kw.get("config")) or _real(*a, **kw))
    _check(*_qkv(2, 2, 200, 64, torch.bfloat16, seed=5), dropout_p=P_DROP, seed=_seed(11))
    assert len(timed) >= 4, f"the autotuners timed {len(timed)} configs"  # several forward and backward ones


def test_dispatch_routes_triton_and_matches_sdpa():
    q, k, v = _qkv(1, 2, 33, 64, torch.float32)
    out = causal_attention(q, k, v, backend="triton")
    torch.testing.assert_close(out, causal_attention(q, k, v, backend="torch"), rtol=1e-5, atol=1e-5)


def test_flash_attention_rejects_bad_inputs():
    q, k, v = _qkv(1, 1, 16, 64, torch.float32)
    with pytest.raises(ValueError, match="head_dim 48 is not supported"):
        flash_attention(*(t[..., :48] for t in (q, k, v)))
    with pytest.raises(ValueError, match="share shape and dtype"):
        flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        flash_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match=r"\(B, n_head, T, head_dim\)"):
        flash_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="dropout needs `seed`"):
        flash_attention_forward(q, k, v, 0.1)


@pytest.mark.parametrize("heads", [(1, 1), (4, 2)], ids=["mha", "gqa"])
def test_flash_attention_opcheck(heads):
    """Schema, fake tensors (under GQA the fake backward gives dk, dv k's shape) and autograd registration."""
    q, k, v = (t.detach().contiguous().requires_grad_() for t in _qkv_gqa(1, *heads, 20, 64, torch.float32))
    seed = _seed(3)
    torch.library.opcheck(
        torch.ops.staged_fast.flash_attention.default, (q, k, v, 0.1, seed),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    o, lse = flash_attention_forward(q, k, v, 0.1, seed)
    torch.library.opcheck(
        torch.ops.staged_fast.flash_attention_bwd.default, (torch.ones_like(o), q, k, v, o, lse, 0.1, seed),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_flash_attention_compiles_fullgraph_with_dropout():
    """torch.compile traces the seed draw and the custom op (forward and backward) with no graph break."""
    q, k, v = _qkv(1, 2, 16, 64, torch.float32)

    def f(q, k, v):
        return flash_attention(q, k, v, dropout_p=0.1).square().mean()

    torch.manual_seed(0)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    out.backward()
    torch.manual_seed(0)
    torch.testing.assert_close(out, f(q, k, v), rtol=0, atol=0)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("heads", [(2, 2), (6, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_compiled_path_equals_eager_path(dropout_p, heads):
    """Eager calls use autograd.Function (low host overhead); compiled graphs use the torch.library op.
    Same seed, same inputs: the same output and gradients, bit for bit (also with n_kv < n_head)."""
    H, H_kv = heads
    g = torch.Generator(device="cpu").manual_seed(11)
    q = torch.randn(1, H, 23, 64, generator=g).to(DEVICE).requires_grad_()
    k, v = (torch.randn(1, H_kv, 23, 64, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    do = torch.randn(1, H, 23, 64, generator=g).to(DEVICE)
    seed = new_seed(q.device) if dropout_p else None

    def run(fn):
        o = fn(q, k, v, dropout_p, seed)
        return (o, *torch.autograd.grad(o, (q, k, v), do))

    eager = run(flash_attention)
    compiled = run(torch.compile(flash_attention, backend="aot_eager", fullgraph=True))
    for a, c in zip(eager, compiled):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_tuned_launch_skips_the_autotuner_once_a_key_has_its_config(monkeypatch):
    """kernels._common.TunedLaunch: the first launch with a key goes through Triton's autotuner (which
    picks the config); later ones launch that config directly (the autotuner's per-call key building
    costs host time) and compute the same, bit for bit."""
    q, k, v = _qkv(1, 2, 21, 32, torch.float32, seed=3)
    do = torch.randn_like(q)
    first = [flash_attention(q, k, v)]
    first += torch.autograd.grad(first[0], (q, k, v), do)
    calls = []
    for kernel in (attention._attn_fwd_kernel, attention._attn_bwd_kernel):
        monkeypatch.setattr(kernel, "run", lambda *a, _run=kernel.run, **kw: calls.append(1) or _run(*a, **kw))
    again = [flash_attention(q, k, v)]
    again += torch.autograd.grad(again[0], (q, k, v), do)
    assert calls == [], "a launch went through the autotuner although its key had a config"
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    chosen = [c for c, _ in attention._launch_fwd._chosen.values()]
    assert chosen and all(isinstance(c, triton.Config) for c in chosen)


def _first_config_below_100(configs, named_args, **kwargs):
    return list(configs[:1]) if named_args["N"] < 100 else list(configs)


@triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["N"],
                 prune_configs_by={"early_config_prune": _first_config_below_100})
@triton.jit
def _iota_kernel(X, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, offs.to(tl.float32), mask=offs < N)


def test_tuned_launch_times_nothing_when_the_prune_leaves_one_config(monkeypatch):
    """With autotuning off (or fp32, or the interpreter) the prune leaves one config. Triton 3.6's autotuner
    still benchmarks that one (launches and L2 flushes per new key; 3.8 skips it), so TunedLaunch launches it
    directly: the autotuner's benchmark is never called, and the config runs and is kept for the key."""
    from staged_fast.kernels._common import TunedLaunch

    launch = TunedLaunch(_iota_kernel)
    monkeypatch.setattr(_iota_kernel, "_bench", lambda *a, **k: pytest.fail("the one config was timed"))
    monkeypatch.setattr(_iota_kernel, "run", lambda *a, **k: pytest.fail("the launch went through the autotuner"))
    x = torch.full((50,), float("nan"), device=DEVICE)
    config = launch(lambda meta: (triton.cdiv(50, meta["BLOCK"]),), ("n", 50), x, 50)
    assert config.kwargs == {"BLOCK": 16} and launch.last is config
    assert torch.equal(x.cpu(), torch.arange(50, dtype=torch.float32))
    assert launch._chosen[("n", 50)][0] is config
    assert _iota_kernel.nargs is None  # left as the autotuner leaves it


@pytest.mark.parametrize("index", range(len(attention._FWD_SHAPES)))
def test_every_gpu_config_matches_float64(monkeypatch, index):
    """Each GPU config of the autotuners (forward config i with backward config i), forced through the
    launchers' chosen-config table, at T = 67 (a multiple of no block), head_dim 96 (64 + 32 columns)
    and dropout 0.1: the masking, tiling and mask streams of every tile shape a GPU may pick."""
    dtype = torch.bfloat16 if CUDA else torch.float32  # the GPU configs are 16-bit ones (fp32 has its own)
    q, k, v = _qkv(1, 2, 67, 96, dtype, seed=4)
    fwd, bwd = attention._FWD_SHAPES[index], attention._BWD_SHAPES[index % len(attention._BWD_SHAPES)]
    t_key = attention._t_key(67)
    forced = {}
    for launch, (m, n, warps, stages), key in (
        (attention._launch_fwd, fwd, (t_key, 96, True, dtype, attention.dot_precision(dtype))),
        (attention._launch_bwd, bwd, (t_key, 96, True, 1, True, dtype, dtype, attention.dot_precision(dtype))),
    ):
        config = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
        monkeypatch.setattr(launch, "_chosen", {key: (config, config.all_kwargs())})
        forced[launch] = config
    _check(q, k, v, dropout_p=P_DROP, seed=_seed(99))
    for launch, config in forced.items():
        assert launch.last is config, "the forced config did not run"


OVER_SHARED, SPILLS = (128, 128, 8, 3), (128, 64, 4, 3)


@pytest.mark.parametrize("head_dim, dropout, pruned", [
    (128, True, {OVER_SHARED, SPILLS}), (128, False, {SPILLS}), (96, True, {SPILLS}), (96, False, set()),
    (64, True, set()),
])
def test_autotune_prune_drops_the_forward_configs_that_do_not_fit(monkeypatch, head_dim, dropout, pruned):
    """The forward prune (host code, no kernel runs) keeps every 16-bit GPU config that fits a T bucket
    of 1024, but drops 128x128/s3 where it needs more than sm_90's 227 KiB of shared memory (head_dim 128
    with dropout: 240 KiB, benchmarks/compile_check.py) and 128x64 on 4 warps where it spills hundreds of
    bytes (head_dim 128; 96 with dropout: benchmarks/kernel_resources.py). fp32 inputs keep their own
    config only."""
    monkeypatch.setattr(attention, "AUTOTUNE", True)
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in attention._FWD_SHAPES + [attention._FWD_FP32]]
    prune = attention._prune("BLOCK_M", attention._fwd_does_not_fit)
    q16 = torch.randn(1, 1, 4, head_dim, dtype=torch.bfloat16)
    kept = prune(configs, {"Q": q16}, T_KEY=1024, HEAD_DIM=head_dim, DROPOUT=dropout)
    shapes = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
    expected = [s for s in attention._FWD_SHAPES if s not in pruned]
    assert shapes == expected and shapes[0] == attention._FWD_SHAPES[0]  # the default is never pruned
    assert len(expected) == len(attention._FWD_SHAPES) - len(pruned)
    kept32 = prune(configs, {"Q": q16.float()}, T_KEY=1024, HEAD_DIM=head_dim, DROPOUT=dropout)
    assert kept32 == [configs[-1]]
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # timing could pick another config (other bits) in another run
    try:
        assert prune(configs, {"Q": q16}, T_KEY=1024, HEAD_DIM=head_dim, DROPOUT=dropout) == [configs[0]]
    finally:
        torch.use_deterministic_algorithms(was)
    monkeypatch.setattr(attention, "AUTOTUNE", False)  # off: the default (first) config alone
    assert prune(configs, {"Q": q16}, T_KEY=1024, HEAD_DIM=head_dim, DROPOUT=dropout) == [configs[0]]


# ---- split dQ (deterministic backward: a dK/dV kernel without dQ, then a dQ kernel, no atomics) ----

# On CPU one dtype per shape, with and without dropout; on CUDA (a compile per key) three cases that reach
# head_dim 64/96/128, every dtype and both dropout settings. The atomic tests above cover the rest.
SPLIT_CASES = (
    [(SHAPES[0], torch.bfloat16, P_DROP), (SHAPES[1], torch.float16, 0.0), (SHAPES[2], torch.float32, P_DROP)]
    if CUDA
    else [(s, DTYPES[i % 3], p) for i, s in enumerate(SHAPES) for p in (0.0, P_DROP)]
)


@pytest.mark.parametrize("case", SPLIT_CASES, ids=_case_id)
def test_split_dq_matches_float64(monkeypatch, case):
    """dq/dk/dv of the split backward against float64 (outputs poisoned first: every dQ row is written
    by the dQ kernel, which has no zeroed accumulator to fall back on)."""
    monkeypatch.setattr(attention, "DQ_MODE", "split")
    shape, dtype, p = case
    _check(*_qkv(*shape, dtype, seed=1), dropout_p=p, seed=_seed(2**40 + 17) if p else None)


@pytest.mark.parametrize("case", [(s, d, P_DROP) for s, d in zip(GQA_SHAPES, DTYPES)], ids=_gqa_case_id)
def test_split_dq_gqa_matches_float64(monkeypatch, case):
    monkeypatch.setattr(attention, "DQ_MODE", "split")
    shape, dtype, p = case
    _check(*_qkv_gqa(*shape, dtype, seed=6), dropout_p=p, seed=_seed(2**41 + 5))


def _count_dq_launches(monkeypatch) -> list:
    """A list that grows by one at each launch of the split mode's dQ kernel."""
    launched = []
    launch = attention._launch_dq
    monkeypatch.setattr(attention, "_launch_dq", lambda *a, **kw: launched.append(1) or launch(*a, **kw))
    return launched


def _grads_in_mode(monkeypatch, mode, q, k, v, do, p, seed):
    monkeypatch.setattr(attention, "DQ_MODE", mode)
    with poisoned_outputs():
        return torch.autograd.grad(flash_attention(q, k, v, p, seed), (q, k, v), do)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_dq_keeps_dk_dv_bit_equal_and_launches_the_dq_kernel(monkeypatch, dtype):
    """The split dK/dV kernel is the atomic one without its dQ GEMM: dk and dv are the same bits; dq differs
    by summation order only (fp32 sums, one rounding to the dtype). And only split runs the dQ kernel."""
    q, k, v = _qkv_gqa(1, 4, 2, 45, 64, dtype, seed=9)
    do = torch.randn_like(q)
    seed = _seed(77)
    launched = _count_dq_launches(monkeypatch)
    atomic = _grads_in_mode(monkeypatch, "atomic", q, k, v, do, P_DROP, seed)
    assert launched == []
    split = _grads_in_mode(monkeypatch, "split", q, k, v, do, P_DROP, seed)
    assert launched == [1]
    for a, b in zip(atomic[1:], split[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ulp = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(atomic[0].float(), split[0].float(), rtol=0, atol=ulp * atomic[0].abs().max().item())


def test_deterministic_algorithms_select_split_dq_and_repeat_bit_for_bit(monkeypatch):
    """torch.use_deterministic_algorithms(True) runs the split dQ whatever DQ_MODE says, and two backward
    passes give the same bits (on a GPU the atomic dQ does not promise that)."""
    monkeypatch.setattr(attention, "DQ_MODE", "atomic")
    q, k, v = _qkv(1, 2, 33, 96, torch.bfloat16 if CUDA else torch.float32, seed=12)
    do = torch.randn_like(q)
    seed = _seed(5)
    launched = _count_dq_launches(monkeypatch)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert attention.dq_mode() == "split"
        runs = [torch.autograd.grad(flash_attention(q, k, v, P_DROP, seed), (q, k, v), do) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(was)
    assert launched == [1, 1]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert attention.dq_mode() == "atomic"


def test_unknown_dq_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(attention, "DQ_MODE", "fast")
    q, k, v = _qkv(1, 1, 8, 16, torch.float32)
    o = flash_attention(q, k, v)
    with pytest.raises(ValueError, match=r"STAGED_FAST_ATTN_DQ='fast': the attention backward's dQ mode is one of atomic, split"):
        o.sum().backward()


@pytest.mark.parametrize("index", range(len(attention._DQ_SHAPES)))
def test_every_gpu_dq_config_matches_float64(monkeypatch, index):
    """Each GPU config of the dQ kernel, forced, at T = 67, head_dim 96 and dropout 0.1 (the dK/dV kernel
    runs its first config)."""
    monkeypatch.setattr(attention, "DQ_MODE", "split")
    dtype = torch.bfloat16 if CUDA else torch.float32
    q, k, v = _qkv(1, 2, 67, 96, dtype, seed=4)
    m, n, warps, stages = attention._DQ_SHAPES[index]
    config = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
    key = (attention._t_key(67), 96, True, dtype, dtype, attention.dot_precision(dtype))
    monkeypatch.setattr(attention._launch_dq, "_chosen", {key: (config, config.all_kwargs())})
    _check(q, k, v, dropout_p=P_DROP, seed=_seed(99))
    assert attention._launch_dq.last is config, "the forced config did not run"
