"""Triton causal flash attention against a float64 reference, under the rule of tests/README.md.

Runs on CUDA when available (kernels compiled, bigger shapes), else on CPU under TRITON_INTERPRET=1.
"""
import pytest
import torch

CUDA = torch.cuda.is_available()
# Without CUDA, tests/conftest.py has set TRITON_INTERPRET=1 before this module (and Triton) is imported.

from staged_fast.kernels import causal_attention
from staged_fast.kernels._common import assert_within_torch_error, poisoned_outputs
from staged_fast.kernels.attention import (
    dropout_mask,
    flash_attention,
    flash_attention_reference,
    new_seed,
)

DEVICE = "cuda" if CUDA else "cpu"
# (B, n_head, T, head_dim): T not a multiple of any block; head_dim 96 is padded to 128 in-kernel.
SHAPES = (
    [(2, 3, 1000, 64), (1, 4, 1500, 96), (2, 2, 513, 128), (1, 2, 37, 96)]
    if CUDA
    else [(2, 2, 37, 64), (1, 2, 100, 96), (1, 1, 45, 128)]
)
# atol per dtype (outputs are O(1) averages of values ~N(0,1)); see tests/README.md.
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qkv(B, H, T, D, dtype, seed=0):
    """q, k, v laid out as the model makes them: views of one (B, T, 3, H, D) tensor (strided)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(B, T, 3, H, D, generator=g).to(DEVICE, dtype)
    return [t.transpose(1, 2).detach().requires_grad_() for t in qkv.unbind(2)]  # (B, H, T, D) views


def _check(q, k, v, dropout_p=0.0, seed=None):
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
    assert_within_torch_error(o, o_torch, o_ref, name="out", atol=ATOL[dtype])
    for name, d, t, r in zip(("dq", "dk", "dv"), grads, grads_torch, grads_ref):
        assert d.dtype == dtype and d.shape == q.shape
        assert_within_torch_error(d, t, r, name=name, atol=2 * ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_flash_attention_matches_float64(shape, dtype):
    _check(*_qkv(*shape, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_attention_dropout_matches_masked_reference(dtype):
    """In-kernel dropout equals the reference with the kernel's own mask, forward and backward."""
    shape = (2, 2, 300, 64) if CUDA else (1, 2, 45, 64)
    torch.manual_seed(0)
    seed = new_seed(DEVICE)
    keep = dropout_mask(seed, *shape[:3], 0.25)
    frac = keep.float().mean().item()
    assert 0.65 < frac < 0.85, f"keep fraction {frac} far from 0.75"
    _check(*_qkv(*shape, dtype, seed=1), dropout_p=0.25, seed=seed)


def test_flash_attention_dropout_reproducible_under_manual_seed():
    q, k, v = _qkv(1, 2, 40, 64, torch.float32)
    torch.manual_seed(123)
    o1 = flash_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(123)
    o2 = flash_attention(q, k, v, dropout_p=0.5)
    o3 = flash_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(o1, o2)
    assert not torch.equal(o1, o3)


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


def test_flash_attention_opcheck():
    q, k, v = (t.detach().contiguous().requires_grad_() for t in _qkv(1, 1, 20, 64, torch.float32))
    seed = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    torch.library.opcheck(
        torch.ops.staged_fast.flash_attention.default, (q, k, v, 0.0, seed),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
