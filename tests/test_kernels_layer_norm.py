"""Triton LayerNorm (+ fused residual) against a float64 reference, under the rule of tests/README.md.

Runs on CUDA when available (kernels compiled), else on CPU under TRITON_INTERPRET=1 (small shapes).
"""
import pytest
import torch

CUDA = torch.cuda.is_available()
# Without CUDA, tests/conftest.py has set TRITON_INTERPRET=1 before this module (and Triton) is imported.

from staged_fast.kernels import layernorm
from staged_fast.kernels._common import assert_within_torch_error, poisoned_outputs
from staged_fast.kernels.layernorm import (
    layer_norm, layer_norm_backward, layer_norm_forward, layer_norm_reference, layer_norm_residual,
)
from staged_fast.kernels.rmsnorm import rms_norm_backward, rms_norm_forward

DEVICE = "cuda" if CUDA else "cpu"
ROWS = (4, 1023) if CUDA else (2, 37)  # 74 rows on CPU: not a multiple of the backward's row groups
# atol per dtype: about one output ulp (outputs are O(1)); see tests/README.md.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _untuned_backward(monkeypatch):
    """GPU: the backward's default config (each new key would compile and time up to 9); the configs
    are each tested below, and the autotuner by its own test."""
    monkeypatch.setattr(layernorm, "AUTOTUNE", False)


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
        layer_norm(x, w, b, 1e-5, residual=r[:1])
    with pytest.raises(ValueError, match="weight and bias are required"):
        layer_norm(x, None, None, 1e-5)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        layer_norm(x.double(), w, b, 1e-5)


def test_layer_norm_opcheck():
    """The torch.library registration is consistent (schema, fake tensors, autograd) for torch.compile."""
    x, r, w, b = _inputs(128, torch.float32)
    torch.library.opcheck(torch.ops.staged_fast.layer_norm.default, (x, w, b, 1e-5, torch.float32), test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(
        torch.ops.staged_fast.layer_norm_residual.default, (x, r, w, b, 1e-5, torch.float32),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_residual_under_autocast_matches_torch(dtype):
    """What training runs under --bf16/--fp16: a 16-bit branch output (a Linear under autocast) added to
    the fp32 residual stream, then normalized, y feeding the next Linear. The kernel must accept the
    mixed dtypes (it once raised), give s in fp32 and y in the autocast dtype, and match torch's
    autocast path (x + residual in fp32, F.layer_norm in fp32, cast by the next Linear) in value and in
    every gradient: x's producer weight, the residual, the norm's weight and bias, the next Linear."""
    hidden = 384
    g = torch.Generator(device="cpu").manual_seed(7)
    branch = torch.nn.Linear(hidden, hidden).to(DEVICE)
    after = torch.nn.Linear(hidden, 64).to(DEVICE)
    w = (1 + 0.2 * torch.randn(hidden, generator=g)).to(DEVICE).requires_grad_()
    b = (0.1 * torch.randn(hidden, generator=g)).to(DEVICE).requires_grad_()
    h = torch.randn(*ROWS, hidden, generator=g).to(DEVICE)
    resid = (2 * torch.randn(*ROWS, hidden, generator=g)).to(DEVICE).requires_grad_()
    grad_out = torch.randn(*ROWS, 64, generator=g).to(DEVICE)
    grad_s = torch.randn(*ROWS, hidden, generator=g).to(DEVICE)
    params = [resid, w, b, branch.weight, after.weight]

    def run(norm):
        with torch.autocast(DEVICE, dtype=dtype):
            x = branch(h)
            assert x.dtype == dtype
            y, s = norm(x, resid, w, b, 1e-5)
            out = after(y)
        (out.float() * grad_out).sum().backward(inputs=params, retain_graph=True)
        (s.float() * grad_s).sum().backward(inputs=params)
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return out, y, s, grads

    with poisoned_outputs():
        out, y, s, grads = run(lambda x, r, w, b, eps: layer_norm(x, w, b, eps, residual=r))
    ref_out, ref_y, ref_s, ref_grads = run(layer_norm_reference_residual)
    assert s.dtype == torch.float32 and y.dtype == dtype and out.dtype == dtype
    torch.testing.assert_close(s, ref_s, rtol=0, atol=0)  # one fp32 add of the same operands
    # one 16-bit ulp: the interpreter's fp32 -> bf16 cast truncates where torch rounds (tests/README.md)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(y.float(), ref_y.to(dtype).float(), rtol=ulp, atol=ATOL[dtype])
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=0.02, atol=ATOL[dtype] * 4)
    for name, a, r in zip(["dresidual", "dweight", "dbias", "dbranch_weight", "dafter_weight"], grads, ref_grads):
        err = ((a - r).norm() / r.norm()).item()
        assert err < (2e-2 if dtype == torch.bfloat16 else 4e-3), f"{name}: relative error {err:.2e}"


def layer_norm_reference_residual(x, r, w, b, eps):
    return layer_norm_reference(x, w, b, eps, residual=r)


@pytest.mark.parametrize("residual", [False, True, "mixed"])
def test_compiled_path_equals_eager_path(residual):
    """Eager calls go through autograd.Function (low host overhead), compiled graphs through the
    torch.library ops: both must give the same outputs and gradients, bit for bit. "mixed": a bf16 x
    with the fp32 residual stream, whose gradient the backward also writes in bf16."""
    x, r, w, b = _inputs(384, torch.float32, seed=5)
    if residual == "mixed":
        x = x.detach().bfloat16().requires_grad_()

    def fn(x, r, w, b):
        out = layer_norm(x, w, b, 1e-5, residual=r if residual else None)
        return out if residual else (out,)

    g = torch.Generator(device="cpu").manual_seed(2)
    grads = [torch.randn(x.shape, generator=g).to(DEVICE) for _ in range(2 if residual else 1)]
    params = [x, r, w, b] if residual else [x, w, b]
    eager_out, eager_grads = _run(fn, (x, r, w, b), grads, params)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    comp_out, comp_grads = _run(compiled, (x, r, w, b), grads, params)
    for a, c in zip(eager_out + eager_grads, comp_out + comp_grads):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def _backward_case(hidden, rms, dy_dtype, seed=0):
    """s (fp32, the residual stream), dy (y's gradient), ds (s's own gradient), weight, and the saved
    statistics from our forward, for calling the backward launchers directly."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = (torch.randn(*ROWS, hidden, generator=g) * 2 + 0.5).to(DEVICE)
    dy = torch.randn(*ROWS, hidden, generator=g).to(DEVICE, dy_dtype)
    ds = torch.randn(*ROWS, hidden, generator=g).to(DEVICE)
    w = (1 + 0.2 * torch.randn(hidden, generator=g)).to(DEVICE)
    b = (0.1 * torch.randn(hidden, generator=g)).to(DEVICE)
    if rms:
        _, _, rstd = rms_norm_forward(s, w, 1e-6)
        return s, dy, ds, w, b, None, rstd
    _, _, mean, rstd = layer_norm_forward(s, w, b, 1e-5)
    return s, dy, ds, w, b, mean, rstd


def _backward_reference(s, dy, ds, w, b, rms, dtype):
    """(dsum, dweight[, dbias]) by autograd through the plain-PyTorch norm, in `dtype`."""
    from staged_fast.kernels.rmsnorm import rms_norm_reference

    leaves = [t.detach().to(dtype).requires_grad_() for t in (s, w, b)]
    y = rms_norm_reference(leaves[0], leaves[1], 1e-6) if rms else layer_norm_reference(*leaves, 1e-5)
    grads = torch.autograd.grad(y, leaves[:2] if rms else leaves, dy.to(dtype))
    return (grads[0] + ds.to(dtype), *grads[1:])


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape", layernorm._BWD_SHAPES, ids=lambda c: "rows{}-warps{}-per_sm{}".format(*c))
def test_every_backward_config_matches_float64(shape, rms):
    """Each config the autotuner may pick (rows per tile, warps, programs per SM: the grid and so the
    partial-sum rows change), forced, at 74 rows (a multiple of no tile height above 1) and hidden 96:
    dsum (with ds and its bf16 copy), dweight and dbias within the 2x-torch rule of float64."""
    s, dy, ds, w, b, mean, rstd = _backward_case(96, rms, torch.bfloat16)
    config = layernorm._bwd_config(*shape)
    with poisoned_outputs():
        out = layernorm.norm_backward("test", dy, s, w, mean, rstd, ds, torch.bfloat16, config=config)
    dsum, dcopy, *param_grads = out
    ref = _backward_reference(s, dy, ds, w, b, rms, torch.float64)
    torch_out = _backward_reference(s, dy, ds, w, b, rms, torch.float32)
    names = ["dsum", "dweight", "dbias"]
    for name, o, t, r in zip(names, (dsum, *param_grads), torch_out, ref):
        assert_within_torch_error(o, t, r, name=name, atol=1e-5 * r.abs().max().item())
    assert dcopy.dtype == torch.bfloat16 and torch.isfinite(dcopy.float()).all()
    torch.testing.assert_close(dcopy.float(), dsum.to(torch.bfloat16).float(), rtol=2.0**-7, atol=0)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("copy_dtype", [torch.bfloat16, torch.float16])
def test_backward_copy_is_the_cast_of_dx(copy_dtype, rms):
    """The 16-bit copy written beside dx is dx rounded to that dtype: exactly on a GPU; the CPU
    interpreter's fp32 -> bf16 cast truncates where torch rounds (one ulp, tests/README.md). dx
    itself is the same with and without the copy."""
    s, dy, ds, w, b, mean, rstd = _backward_case(384, rms, copy_dtype, seed=4)
    backward = (lambda *a, **k: rms_norm_backward(dy, s, w, rstd, ds, **k)) if rms else (
        lambda *a, **k: layer_norm_backward(dy, s, w, mean, rstd, ds, **k))
    with poisoned_outputs():
        plain = backward()
        dx, dcopy, *param_grads = backward(copy_dtype=copy_dtype)
    torch.testing.assert_close(dx, plain[0], rtol=0, atol=0)
    for a, p in zip(param_grads, plain[1:]):
        torch.testing.assert_close(a, p, rtol=0, atol=0)
    exact = CUDA or copy_dtype == torch.float16
    torch.testing.assert_close(dcopy, dx.to(copy_dtype), rtol=0 if exact else 2.0**-7, atol=0)


def test_residual_gradients_for_bf16_plus_fp16():
    """x bf16 + residual fp16 sum to fp32 (torch's promotion): both gradients differ from s's dtype,
    one comes from the kernel's copy, the other from a cast; each in its input's dtype and equal to
    torch's."""
    x, r, w, b = _inputs(384, torch.float32, seed=9)
    x = x.detach().bfloat16().requires_grad_()
    r = r.detach().half().requires_grad_()
    g = torch.Generator(device="cpu").manual_seed(3)
    grads = [torch.randn(x.shape, generator=g).to(DEVICE) for _ in range(2)]
    outs, (dx, dr) = _run(lambda x, r: layer_norm(x, w, b, 1e-5, residual=r), (x, r), grads, [x, r])
    ref_outs, (ref_dx, ref_dr) = _run(
        lambda x, r: layer_norm_reference(x.float(), w, b, 1e-5, residual=r.float()), (x, r), grads, [x, r])
    assert outs[1].dtype == torch.float32 and dx.dtype == torch.bfloat16 and dr.dtype == torch.float16
    torch.testing.assert_close(dx.float(), ref_dx.float(), rtol=2.0**-7, atol=1e-4)
    torch.testing.assert_close(dr.float(), ref_dr.float(), rtol=2.0**-10, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="autotuning needs a GPU (the interpreter runs the default config)")
def test_autotuned_backward_matches_float64(monkeypatch):
    """With autotuning on, the backward is timed in every config that fits and re-run in the best; the
    partial sums are read over that config's grid. A row count no other test uses: tuned here."""
    monkeypatch.setattr(layernorm, "AUTOTUNE", True)
    for rms in (False, True):
        s, dy, ds, w, b, mean, rstd = _backward_case(768, rms, torch.bfloat16, seed=6)
        s, dy, ds = s[:, :999], dy[:, :999], ds[:, :999]
        mean = None if rms else mean.view(ROWS)[:, :999].reshape(-1)
        rstd = rstd.view(ROWS)[:, :999].reshape(-1)
        dsum, dcopy, *param_grads = layernorm.norm_backward("test", dy, s, w, mean, rstd, ds, torch.bfloat16)
        ref = _backward_reference(s, dy, ds, w, b, rms, torch.float64)
        torch_out = _backward_reference(s, dy, ds, w, b, rms, torch.float32)
        for name, o, t, r in zip(["dsum", "dweight", "dbias"], (dsum, *param_grads), torch_out, ref):
            assert_within_torch_error(o, t, r, name=name, atol=1e-5 * r.abs().max().item())
        torch.testing.assert_close(dcopy, dsum.to(torch.bfloat16), rtol=0, atol=0)


def test_autotuning_is_off_under_deterministic_algorithms():
    """The norm backward (and attention) autotune only when their switch is on and deterministic algorithms
    are off: timing may choose another tiling in another run, and the tiling orders the partial sums."""
    from staged_fast.kernels._common import autotuning

    assert not torch.are_deterministic_algorithms_enabled()
    assert autotuning(True) is True and autotuning(False) is False
    torch.use_deterministic_algorithms(True)
    try:
        assert autotuning(True) is False
    finally:
        torch.use_deterministic_algorithms(False)


def test_configs_differing_only_in_programs_per_sm_share_one_compile():
    """PROGRAMS_PER_SM only sizes the backward's grid on the host. As a constexpr each of its values compiled
    the same kernel again (9 backward configs took 9 compiles per new shape, 5 distinct). A plain integer
    argument is specialised by Triton's JIT on divisibility by 16 and on being 1, not on its value."""
    from staged_fast.kernels import layernorm

    kernel = layernorm._norm_bwd_kernel.fn  # the jit (or interpreted) function under the autotuner
    annotations = kernel.fn.__annotations__
    assert "constexpr" in str(annotations["BLOCK_M"]) and "constexpr" not in str(annotations.get("PROGRAMS_PER_SM"))
    shapes = {(c[0], c[1]) for c in layernorm._BWD_SHAPES}
    assert len(shapes) < len(layernorm._BWD_SHAPES)  # the autotuner has configs that differ only in it
