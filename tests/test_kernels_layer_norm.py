"""Triton LayerNorm (+ fused residual) against a float64 reference, under the rule of tests/README.md.

Runs on CUDA when available (kernels compiled), else on CPU under TRITON_INTERPRET=1 (small shapes).
"""
import pytest
import torch

CUDA = torch.cuda.is_available()
# Without CUDA, tests/conftest.py has set TRITON_INTERPRET=1 before this module (and Triton) is imported.

from staged_fast.kernels._common import assert_within_torch_error, poisoned_outputs
from staged_fast.kernels.layernorm import layer_norm, layer_norm_reference, layer_norm_residual

DEVICE = "cuda" if CUDA else "cpu"
ROWS = (4, 1023) if CUDA else (2, 37)  # 74 rows on CPU: not a multiple of the backward's row groups
# atol per dtype: about one output ulp (outputs are O(1)); see tests/README.md.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(hidden, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(*ROWS, hidden, generator=g) * 2 + 0.5
    r = torch.randn(*ROWS, hidden, generator=g)
    w = 1 + 0.2 * torch.randn(hidden, generator=g)
    b = 0.1 * torch.randn(hidden, generator=g)
    return [t.to(DEVICE, dtype).requires_grad_() for t in (x, r, w, b)]


def _run(fn, inputs, grads, params):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return outs, torch.autograd.grad(outs, params, grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [128, 384, 768, 1536] + ([3072] if CUDA else []))
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_matches_float64(dtype, hidden, residual):
    x, r, w, b = _inputs(hidden, dtype)
    eps = 1e-5
    if residual:
        params = [x, r, w, b]
        kernel = lambda x, r, w, b: layer_norm(x, w, b, eps, residual=r)  # noqa: E731
        reference = lambda x, r, w, b: layer_norm_reference(x, w, b, eps, residual=r)  # noqa: E731
    else:
        params = [x, w, b]
        kernel = lambda x, r, w, b: layer_norm(x, w, b, eps)  # noqa: E731
        reference = lambda x, r, w, b: layer_norm_reference(x, w, b, eps)  # noqa: E731
    g = torch.Generator(device="cpu").manual_seed(1)
    n_out = 2 if residual else 1
    grads = [torch.randn(*ROWS, hidden, generator=g).to(DEVICE, dtype) for _ in range(n_out)]

    with poisoned_outputs():
        outs, dparams = _run(kernel, (x, r, w, b), grads, params)
    torch_outs, torch_dparams = _run(reference, (x, r, w, b), grads, params)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, r, w, b)]
    params64 = leaves64 if residual else [leaves64[0], leaves64[2], leaves64[3]]
    ref_outs, ref_dparams = _run(reference, leaves64, [gr.double() for gr in grads], params64)

    for i, (o, t, ref) in enumerate(zip(outs, torch_outs, ref_outs)):
        assert o.dtype == dtype and o.shape == x.shape
        assert_within_torch_error(o, t, ref, name=f"output {i}", atol=ATOL[dtype])
    names = ["dx", "dresidual", "dweight", "dbias"] if residual else ["dx", "dweight", "dbias"]
    # dweight/dbias sum over rows: their error grows with the row count, so atol scales with sqrt(rows).
    rows = ROWS[0] * ROWS[1]
    for name, d, t, ref in zip(names, dparams, torch_dparams, ref_dparams):
        atol = ATOL[dtype] * (rows**0.5 if name in ("dweight", "dbias") else 4)
        assert d.dtype == dtype
        assert_within_torch_error(d, t, ref, name=name, atol=atol)


def test_layer_norm_residual_alias_and_strided_input():
    """layer_norm_residual == layer_norm(residual=...); a non-contiguous x (a view) is accepted."""
    x, r, w, b = _inputs(384, torch.float32, seed=3)
    y1, s1 = layer_norm_residual(x, r, w, b)
    y2, s2 = layer_norm(x, w, b, 1e-5, residual=r)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)
    wide = torch.randn(ROWS[1], 2 * 384, device=DEVICE)
    view = wide[:, :384]  # row stride 768, unit column stride
    torch.testing.assert_close(
        layer_norm(view, w, b, 1e-5), layer_norm_reference(view, w, b, 1e-5), rtol=1e-5, atol=1e-5
    )


def test_layer_norm_rejects_bad_inputs():
    x, r, w, b = _inputs(128, torch.float32)
    with pytest.raises(ValueError, match="weight and bias must have shape"):
        layer_norm(x, w[:64], b, 1e-5)
    with pytest.raises(ValueError, match="residual must match"):
        layer_norm(x, w, b, 1e-5, residual=r.half())
    with pytest.raises(ValueError, match="weight and bias are required"):
        layer_norm(x, None, None, 1e-5)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        layer_norm(x.double(), w, b, 1e-5)


def test_layer_norm_opcheck():
    """The torch.library registration is consistent (schema, fake tensors, autograd) for torch.compile."""
    x, r, w, b = _inputs(128, torch.float32)
    torch.library.opcheck(torch.ops.staged_fast.layer_norm.default, (x, w, b, 1e-5), test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(
        torch.ops.staged_fast.layer_norm_residual.default, (x, r, w, b, 1e-5),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
