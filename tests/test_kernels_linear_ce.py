"""Fused linear + cross-entropy against a float64 reference, under the rule of tests/README.md.

Runs on CUDA when available (kernels compiled, GPT-2 vocab), else on CPU under TRITON_INTERPRET=1.
"""
import pytest
import torch

CUDA = torch.cuda.is_available()
# Without CUDA, tests/conftest.py has set TRITON_INTERPRET=1 before this module (and Triton) is imported.

from staged_fast.kernels import linear_cross_entropy
from staged_fast.kernels._common import assert_within_torch_error, poisoned_outputs
from staged_fast.kernels.fused_linear_ce import (
    fused_linear_cross_entropy,
    linear_cross_entropy_forward,
    linear_cross_entropy_reference,
)

DEVICE = "cuda" if CUDA else "cpu"
# (N tokens, d hidden, V vocab): V not a power of two; several chunks (C x V ~ N x d).
SHAPES = [(1000, 768, 50257), (333, 384, 1000)] if CUDA else [(70, 64, 1000), (37, 96, 2053)]
# atol relative to each gradient's max |ref| (grads are O(1/N)). The loss is computed in fp32 from the
# same logits torch uses, so its atol is 1e-5 x |loss| in every dtype.
RTOL_OF_MAX = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if CUDA else [])


def _inputs(n, d, v, dtype, seed=0, ignore_every=7):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.5 * 2  # logits ~ N(0, 4): a peaked softmax
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::ignore_every] = -100
    return hidden.to(DEVICE, dtype).requires_grad_(), weight.to(DEVICE, dtype).requires_grad_(), targets.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_linear_ce_matches_float64(shape, dtype):
    h, w, t = _inputs(*shape, dtype)
    scale = 1.7  # a grad_output != 1 checks the backward's scaling
    with poisoned_outputs():
        loss = fused_linear_cross_entropy(h, w, t)
        gh, gw = torch.autograd.grad(loss * scale, (h, w))
    loss_torch = linear_cross_entropy_reference(h, w, t)
    gh_torch, gw_torch = torch.autograd.grad(loss_torch * scale, (h, w))
    h64, w64 = (x.detach().double().requires_grad_() for x in (h, w))
    loss_ref = linear_cross_entropy_reference(h64, w64, t)
    gh_ref, gw_ref = torch.autograd.grad(loss_ref * scale, (h64, w64))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert gh.dtype == dtype and gw.dtype == dtype
    for name, out, tor, ref in (("loss", loss, loss_torch, loss_ref), ("grad_hidden", gh, gh_torch, gh_ref),
                                ("grad_weight", gw, gw_torch, gw_ref)):
        atol = (1e-5 if name == "loss" else RTOL_OF_MAX[dtype]) * ref.abs().max().item()
        assert_within_torch_error(out, tor, ref, name=name, atol=atol)


def test_fused_linear_ce_gpt2_vocab():
    """The real vocabulary (50257, not a power of two: a masked last slice)."""
    n, d = (512, 768) if CUDA else (6, 32)
    h, w, t = _inputs(n, d, 50257, torch.float32, ignore_every=5)
    with poisoned_outputs():
        loss = fused_linear_cross_entropy(h, w, t)
        gh, gw = torch.autograd.grad(loss, (h, w))
    h64, w64 = (x.detach().double().requires_grad_() for x in (h, w))
    ref = linear_cross_entropy_reference(h64, w64, t)
    gh_ref, gw_ref = torch.autograd.grad(ref, (h64, w64))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.double(), gh_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [1, 16, 10_000])
def test_chunking_does_not_change_the_result(chunk_rows):
    h, w, t = _inputs(37, 64, 300, torch.float32)
    with torch.no_grad(), poisoned_outputs():
        loss, gh, gw, inv_n = linear_cross_entropy_forward(h, w, t, chunk_rows=chunk_rows)
        loss0, gh0, gw0, _ = linear_cross_entropy_forward(h, w, t)
    # the forward's gradients are unnormalised (x n_valid); compare the loss's gradients
    gh, gw, gh0, gw0 = (g * inv_n for g in (gh, gw, gh0, gw0))
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, gh0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, gw0, rtol=1e-5, atol=1e-7)


def test_no_grad_path_and_dispatch():
    h, w, t = _inputs(37, 64, 300, torch.float32)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, t)
    ref = linear_cross_entropy_reference(h.detach(), w.detach(), t)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        linear_cross_entropy(h, w, t, backend="triton"), linear_cross_entropy(h, w, t, backend="torch"),
        rtol=1e-5, atol=1e-5,
    )


def test_ignore_index_and_out_of_range_targets():
    h, w, t = _inputs(20, 32, 100, torch.float32)
    t_all = torch.full_like(t, -100)
    assert torch.isnan(fused_linear_cross_entropy(h, w, t_all))  # 0/0, as F.cross_entropy
    t_custom = t.clamp(min=0)
    t_custom[::3] = 5000  # a custom ignore_index outside [0, V)
    ref = linear_cross_entropy_reference(h, w, t_custom, ignore_index=5000)
    torch.testing.assert_close(fused_linear_cross_entropy(h, w, t_custom, ignore_index=5000), ref, rtol=1e-5, atol=1e-5)
    t_bad = t.clone()
    t_bad[4] = 100  # == V: out of range -> NaN loss instead of a host-synchronizing check
    assert torch.isnan(fused_linear_cross_entropy(h, w, t_bad))


def test_rejects_bad_inputs():
    h, w, t = _inputs(20, 32, 100, torch.float32)
    with pytest.raises(ValueError, match="dtypes differ"):
        fused_linear_cross_entropy(h, w.bfloat16(), t)
    with pytest.raises(ValueError, match=r"hidden must be \(N, d\)"):
        fused_linear_cross_entropy(h[:, :16], w, t)
    with pytest.raises(ValueError, match="targets must be an integer tensor"):
        fused_linear_cross_entropy(h, w, t[:5])


def test_opcheck():
    h, w, t = _inputs(20, 32, 100, torch.float32)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.staged_fast.linear_cross_entropy.default, (h, w, t, -100), test_utils=utils)
    torch.library.opcheck(torch.ops.staged_fast.linear_cross_entropy_loss.default, (h, w, t, -100), test_utils=utils)


def _relative_error(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def test_fp16_gradients_survive_the_loss_scale():
    """GradScaler multiplies the loss by 65536 and the gradient arrives in the backward; a forward that
    rounds dz / n_valid to fp16 first loses the small softmax entries (they fall below fp16's smallest
    subnormal, 6e-8, once divided by n). Ours must be as accurate as torch's fp16 path (full fp16
    logits, F.cross_entropy in fp32, the scaled gradient cast back to fp16)."""
    n, d, v = (8192, 256, 50257) if CUDA else (4096, 64, 1024)
    h, w, t = _inputs(n, d, v, torch.float16, ignore_every=11)
    loss_scale = 65536.0
    with poisoned_outputs():
        gh, gw = torch.autograd.grad(fused_linear_cross_entropy(h, w, t) * loss_scale, (h, w))
    gh_torch, gw_torch = torch.autograd.grad(linear_cross_entropy_reference(h, w, t) * loss_scale, (h, w))
    h64, w64 = (x.detach().double().requires_grad_() for x in (h, w))
    gh_ref, gw_ref = torch.autograd.grad(linear_cross_entropy_reference(h64, w64, t) * loss_scale, (h64, w64))
    for name, ours, theirs, ref in (("grad_hidden", gh, gh_torch, gh_ref), ("grad_weight", gw, gw_torch, gw_ref)):
        err, torch_err = _relative_error(ours, ref), _relative_error(theirs, ref)
        print(f"{name}: relative error {err:.2e}, torch's {torch_err:.2e}")
        assert torch.isfinite(ours).all() and ours.dtype == torch.float16
        assert err <= 1.5 * torch_err, f"{name}: relative error {err:.2e} vs torch's {torch_err:.2e}"


def test_fp32_output_probe_is_not_fooled_by_autocast(monkeypatch):
    """The mode probe runs on the first training step, under autocast. With autocast on, its fp32 reference
    product came out 16-bit, both modes were judged missing and every step took the slow "cast" path (with a
    false warning). torch.mm/addmm stand in for torch 2.11 on CUDA (mm takes out_dtype=float32 and checks
    `out`'s dtype; addmm refuses the fp32 addend), since CPU torch has neither."""
    from staged_fast.kernels import fused_linear_ce

    real_mm = torch.mm

    def mm_as_on_cuda(a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return real_mm(a, b) if out is None else real_mm(a, b, out=out)
        if out is not None and out.dtype != out_dtype:
            raise RuntimeError(f"Expected out tensor to have dtype {out_dtype}, but got {out.dtype} instead")
        with torch.autocast("cpu", enabled=False):
            result = real_mm(a.to(out_dtype), b.to(out_dtype))
        return result if out is None else out.copy_(result)

    def addmm_as_on_cuda(*args, out_dtype=None, **kwargs):
        raise RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16")

    monkeypatch.setattr(torch, "mm", mm_as_on_cuda)
    monkeypatch.setattr(torch, "addmm", addmm_as_on_cuda)
    cpu = torch.device("cpu")
    assert fused_linear_ce.probe_fp32_output_mode(cpu, torch.bfloat16) == "mm"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_linear_ce.probe_fp32_output_mode(cpu, torch.bfloat16) == "mm"


def test_forward_body_ignores_the_callers_autocast():
    """The op's body inherits the caller's autocast; its matmuls have their dtypes chosen (fp32 inputs here,
    as the tests and --kernels triton without --bf16 feed it), and under autocast they were recast to 16 bits.
    The same inputs give the same bits with autocast on and off."""
    h, w, t = _inputs(*SHAPES[1], torch.float32, seed=3)
    h, w = h.detach(), w.detach()
    plain = linear_cross_entropy_forward(h, w, t)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        under_autocast = linear_cross_entropy_forward(h, w, t)
    for name, a, b in zip(("loss", "grad_hidden", "grad_weight", "inv_n"), plain, under_autocast):
        assert a.dtype == b.dtype == torch.float32, name
        assert torch.equal(a, b), name


@pytest.mark.skipif(not CUDA, reason="the fp32-output GEMM modes are cuBLAS paths (16-bit inputs on CUDA)")
@pytest.mark.parametrize("mode", ["addmm", "mm", "cast"])
def test_every_fp32_gemm_mode_matches_float64(monkeypatch, mode):
    """Each way the gradient GEMMs may write fp32 (fused_linear_ce.fp32_output_mode: what this torch
    supports is probed once): forced in turn where this torch has it, bf16, several chunks."""
    from staged_fast.kernels import fused_linear_ce

    probed = fused_linear_ce.fp32_output_mode(torch.device(DEVICE, torch.cuda.current_device()), torch.bfloat16)
    order = ["addmm", "mm", "cast"]
    if order.index(mode) < order.index(probed):
        pytest.skip(f"this torch has no {mode!r} mode (probed: {probed!r})")
    monkeypatch.setitem(fused_linear_ce._FP32_OUTPUT_MODE,
                        (torch.device(DEVICE, torch.cuda.current_device()), torch.bfloat16), mode)
    h, w, t = _inputs(*SHAPES[1], torch.bfloat16, seed=8)
    loss = fused_linear_cross_entropy(h, w, t)
    gh, gw = torch.autograd.grad(loss, (h, w))
    gh_torch, gw_torch = torch.autograd.grad(linear_cross_entropy_reference(h, w, t), (h, w))
    h64, w64 = (x.detach().double().requires_grad_() for x in (h, w))
    gh_ref, gw_ref = torch.autograd.grad(linear_cross_entropy_reference(h64, w64, t), (h64, w64))
    for name, out, tor, ref in (("grad_hidden", gh, gh_torch, gh_ref), ("grad_weight", gw, gw_torch, gw_ref)):
        assert_within_torch_error(out, tor, ref, name=name, atol=RTOL_OF_MAX[torch.bfloat16] * ref.abs().max().item())
