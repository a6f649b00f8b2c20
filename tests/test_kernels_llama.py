"""Triton RMSNorm (+ fused residual), fused SwiGLU and RoPE (one tensor; q and k in one launch) against
float64 references (rule of tests/README.md), fp32/bf16/fp16, poisoned outputs, under autocast, compiled
path == eager path, and the llama model with --kernels triton equal to --kernels torch. CPU: TRITON_INTERPRET=1
(set by conftest), small shapes."""
import pytest
import torch

CUDA = torch.cuda.is_available()

from staged_fast.kernels._common import assert_within_torch_error, poisoned_outputs
from staged_fast.kernels.rmsnorm import rms_norm, rms_norm_reference, rms_norm_residual
from staged_fast.kernels.fused_swiglu import swiglu, swiglu_reference

DEVICE = "cuda" if CUDA else "cpu"
ROWS = (4, 1023) if CUDA else (2, 37)
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _run(fn, inputs, grads, params):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return outs, torch.autograd.grad(outs, params, grads)


def _rms_inputs(hidden, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(*ROWS, hidden, generator=g) * 2 + 0.5
    r = torch.randn(*ROWS, hidden, generator=g)
    w = 1 + 0.2 * torch.randn(hidden, generator=g)
    return [t.to(DEVICE, dtype).requires_grad_() for t in (x, r, w)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [96, 384])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_matches_float64(dtype, hidden, residual):
    x, r, w = _rms_inputs(hidden, dtype)
    eps = 1e-6
    if residual:
        params = [x, r, w]
        kernel = lambda x, r, w: rms_norm(x, w, eps, residual=r)  # noqa: E731
        reference = lambda x, r, w: rms_norm_reference(x, w, eps, residual=r)  # noqa: E731
    else:
        params = [x, w]
        kernel = lambda x, r, w: rms_norm(x, w, eps)  # noqa: E731
        reference = lambda x, r, w: rms_norm_reference(x, w, eps)  # noqa: E731
    g = torch.Generator(device="cpu").manual_seed(1)
    grads = [torch.randn(*ROWS, hidden, generator=g).to(DEVICE, dtype) for _ in range(2 if residual else 1)]
    with poisoned_outputs():
        outs, dparams = _run(kernel, (x, r, w), grads, params)
    torch_outs, torch_dparams = _run(reference, (x, r, w), grads, params)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, r, w)]
    params64 = leaves64 if residual else [leaves64[0], leaves64[2]]
    ref_outs, ref_dparams = _run(reference, leaves64, [gr.double() for gr in grads], params64)
    for i, (o, t, ref) in enumerate(zip(outs, torch_outs, ref_outs)):
        assert o.dtype == dtype and o.shape == x.shape
        assert_within_torch_error(o, t, ref, name=f"output {i}", atol=ATOL[dtype])
    names = ["dx", "dresidual", "dweight"] if residual else ["dx", "dweight"]
    rows = ROWS[0] * ROWS[1]
    for name, d, t, ref in zip(names, dparams, torch_dparams, ref_dparams):
        assert d.dtype == dtype
        assert_within_torch_error(d, t, ref, name=name, atol=ATOL[dtype] * (rows**0.5 if name == "dweight" else 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_float64(dtype):
    g = torch.Generator(device="cpu").manual_seed(2)
    shape = (*ROWS, 192)  # 14208 elements on CPU: not a multiple of the block
    gate = (2 * torch.randn(shape, generator=g)).to(DEVICE, dtype).requires_grad_()
    up = torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_()
    dout = torch.randn(shape, generator=g).to(DEVICE, dtype)
    with poisoned_outputs():
        outs, grads = _run(swiglu, (gate, up), [dout], [gate, up])
    t_outs, t_grads = _run(swiglu_reference, (gate, up), [dout], [gate, up])
    g64, u64 = (t.detach().double().requires_grad_() for t in (gate, up))
    r_outs, r_grads = _run(swiglu_reference, (g64, u64), [dout.double()], [g64, u64])
    assert outs[0].dtype == dtype
    assert_within_torch_error(outs[0], t_outs[0], r_outs[0], name="out", atol=ATOL[dtype])
    for name, d, t, r in zip(("dgate", "dup"), grads, t_grads, r_grads):
        assert d.dtype == dtype
        assert_within_torch_error(d, t, r, name=name, atol=ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llama_block_ops_under_autocast(dtype):
    """As --bf16/--fp16 train: a 16-bit branch output + the fp32 residual stream through rms_norm_residual
    (s fp32, y in the autocast dtype), then gate/up Linears into swiglu; values and gradients as torch's."""
    hidden, ffn = 96, 192
    gen = torch.Generator(device="cpu").manual_seed(7)
    branch = torch.nn.Linear(hidden, hidden, bias=False).to(DEVICE)
    gate_l = torch.nn.Linear(hidden, ffn, bias=False).to(DEVICE)
    up_l = torch.nn.Linear(hidden, ffn, bias=False).to(DEVICE)
    w = (1 + 0.2 * torch.randn(hidden, generator=gen)).to(DEVICE).requires_grad_()
    h = torch.randn(*ROWS, hidden, generator=gen).to(DEVICE)
    resid = (2 * torch.randn(*ROWS, hidden, generator=gen)).to(DEVICE).requires_grad_()
    grad_out = torch.randn(*ROWS, ffn, generator=gen).to(DEVICE)
    params = [resid, w, branch.weight, gate_l.weight, up_l.weight]

    def run(norm, act):
        with torch.autocast(DEVICE, dtype=dtype):
            y, s = norm(branch(h), resid, w, 1e-6)
            out = act(gate_l(y), up_l(y))
        ((out.float() * grad_out).sum() + s.float().sum()).backward(inputs=params)
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return out, y, s, grads

    with poisoned_outputs():
        out, y, s, grads = run(lambda x, r, w, eps: rms_norm_residual(x, r, w, eps), swiglu)
    ref_out, ref_y, ref_s, ref_grads = run(lambda x, r, w, eps: rms_norm_reference(x, w, eps, residual=r),
                                           swiglu_reference)
    assert s.dtype == torch.float32 and y.dtype == dtype and out.dtype == dtype
    torch.testing.assert_close(s, ref_s, rtol=0, atol=0)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(y.float(), ref_y.to(dtype).float(), rtol=2 * ulp, atol=ATOL[dtype])
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=0.03, atol=ATOL[dtype] * 4)
    for name, a, r in zip(["dresidual", "dweight", "dbranch", "dgate", "dup"], grads, ref_grads):
        err = ((a - r).norm() / r.norm()).item()
        assert err < (2e-2 if dtype == torch.bfloat16 else 4e-3), f"{name}: relative error {err:.2e}"


def test_compiled_path_equals_eager_path_and_opcheck():
    x, r, w = _rms_inputs(96, torch.float32, seed=5)
    gate, up = (t.detach().clone().requires_grad_() for t in (x, r))

    from staged_fast.kernels.rope import rope
    from staged_fast.llama import rope_cos_sin

    cos, sin = (t[:, :16] for t in rope_cos_sin(torch.arange(x.shape[1], device=DEVICE), 32, 1e4, torch.float32))

    def fn(x, r, w, gate, up):
        y, s = rms_norm(x, w, 1e-6, residual=r)
        return y, s, rms_norm(s, w, 1e-6), swiglu(gate, up) + rope(gate.view(*gate.shape[:2], 3, 32), cos, sin).flatten(2)

    gen = torch.Generator(device="cpu").manual_seed(2)
    grads = [torch.randn(x.shape, generator=gen).to(DEVICE) for _ in range(4)]
    params = [x, r, w, gate, up]
    eager = _run(fn, (x, r, w, gate, up), grads, params)
    compiled = _run(torch.compile(fn, backend="aot_eager", fullgraph=True), (x, r, w, gate, up), grads, params)
    for a, c in zip(eager[0] + eager[1], compiled[0] + compiled[1]):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.staged_fast.rms_norm.default, (x, w, 1e-6, torch.float32), test_utils=utils)
    torch.library.opcheck(torch.ops.staged_fast.rms_norm_residual.default, (x, r, w, 1e-6, torch.float32),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.staged_fast.swiglu.default, (gate, up), test_utils=utils)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
def test_llama_model_triton_equals_torch(n_kv_head, monkeypatch):
    """Whole model, torch (SDPA enable_gqa) vs triton backend; the flash kernel gets the n_kv_head K/V heads."""
    from staged_fast.config import GPTConfig
    from staged_fast.kernels import attention
    from staged_fast.model import GPT

    kv_heads = []
    kernel = attention.flash_attention

    def spy(q, k, v, *args, **kwargs):
        kv_heads.append((q.shape[1], k.shape[1], v.shape[1]))
        return kernel(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention, "flash_attention", spy)
    torch.manual_seed(0)
    cfg = GPTConfig(arch="llama", n_layer=2, n_embd=64, n_head=4, n_kv_head=n_kv_head, intermediate_size=192,
                    vocab_size=67, n_positions=16, dropout=0.0, attn_dropout=0.0)
    model = GPT(cfg).to(DEVICE)
    idx = torch.randint(0, 67, (2, 16), device=DEVICE)
    loss_t = model(idx, idx)
    grads_t = torch.autograd.grad(loss_t, list(model.parameters()))
    model.set_kernels("triton")
    loss_k = model(idx, idx)
    grads_k = torch.autograd.grad(loss_k, list(model.parameters()))
    assert kv_heads == [(4, n_kv_head, n_kv_head)] * 2  # one call per layer, K/V not repeated
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_k, grads_t):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,head_dim", [(3, 96), (2, 16)])
def test_rope_matches_float64(dtype, heads, head_dim):
    from staged_fast.kernels.rope import rope, rope_reference
    from staged_fast.llama import rope_cos_sin

    T = 37
    gen = torch.Generator(device="cpu").manual_seed(4)
    x = torch.randn(2, T, heads, head_dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(2, T, heads, head_dim, generator=gen).to(DEVICE, dtype)
    pos = torch.arange(T, device=DEVICE)
    cos, sin = (t[:, : head_dim // 2] for t in rope_cos_sin(pos, head_dim, 500.0, dtype))
    with poisoned_outputs():
        outs, grads = _run(lambda x: rope(x, cos, sin), (x,), [dy], [x])
    t_outs, t_grads = _run(lambda x: rope_reference(x, cos, sin), (x,), [dy], [x])
    x64 = x.detach().double().requires_grad_()
    r_outs, r_grads = _run(lambda x: rope_reference(x, cos.double(), sin.double()), (x64,), [dy.double()], [x64])
    assert outs[0].dtype == dtype and grads[0].dtype == dtype
    assert_within_torch_error(outs[0], t_outs[0], r_outs[0], name="y", atol=ATOL[dtype] * 4)
    assert_within_torch_error(grads[0], t_grads[0], r_grads[0], name="dx", atol=ATOL[dtype] * 4)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.staged_fast.rope.default, (x, cos, sin, False), test_utils=utils)


def _qk_views(B, T, n_head, n_kv_head, head_dim, dtype, gen):
    """q (B, T, n_head, hd) and k (B, T, n_kv_head, hd) as strided views of one projection output
    (B, T, (n_head + 2 n_kv_head) hd), as a fused q/k/v projection makes them."""
    proj = torch.randn(B, T, (n_head + 2 * n_kv_head) * head_dim, generator=gen).to(DEVICE, dtype)
    q = proj[..., : n_head * head_dim].view(B, T, n_head, head_dim)
    k = proj[..., n_head * head_dim: (n_head + n_kv_head) * head_dim].view(B, T, n_kv_head, head_dim)
    return q, k


def _cos_sin(T, head_dim, dtype):
    from staged_fast.llama import rope_cos_sin

    return [t[:, : head_dim // 2] for t in rope_cos_sin(torch.arange(T, device=DEVICE), head_dim, 500.0, dtype)]


class _LaunchSpy:
    """Stands in for rope._rope_kernel and records the grid of every launch."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [96, 64])
def test_rope_qk_matches_float64(dtype, head_dim, monkeypatch):
    """One launch forward, one backward, for q with 6 heads and k with 2 (GQA), both strided views of a
    projection output; the gradients arrive in the transposed layout attention's backward gives them."""
    from staged_fast.kernels import rope as rope_module
    from staged_fast.kernels.rope import rope_qk, rope_qk_reference

    B, T, nh, nkv = 2, 37, 6, 2
    gen = torch.Generator(device="cpu").manual_seed(6)
    q, k = (t.requires_grad_() for t in _qk_views(B, T, nh, nkv, head_dim, dtype, gen))
    assert not q.is_contiguous() and not k.is_contiguous()
    grads = [torch.randn(B, h, T, head_dim, generator=gen).to(DEVICE, dtype).transpose(1, 2) for h in (nh, nkv)]
    cos, sin = _cos_sin(T, head_dim, dtype)
    spy = _LaunchSpy(rope_module._rope_kernel)
    monkeypatch.setattr(rope_module, "_rope_kernel", spy)
    with poisoned_outputs():
        outs, dqk = _run(lambda q, k: rope_qk(q, k, cos, sin), (q, k), grads, [q, k])
    assert len(spy.grids) == 2 and spy.grids[0] == spy.grids[1]  # forward, backward: one launch each
    t_outs, t_dqk = _run(lambda q, k: rope_qk_reference(q, k, cos, sin), (q, k), grads, [q, k])
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    r_outs, r_dqk = _run(lambda q, k: rope_qk_reference(q, k, cos.double(), sin.double()), (q64, k64),
                         [g.double() for g in grads], [q64, k64])
    for name, a, t, r, like in zip(("q_rot", "k_rot", "dq", "dk"), outs + dqk, t_outs + t_dqk, r_outs + r_dqk,
                                   (q, k, q, k)):
        assert a.dtype == dtype and a.shape == like.shape, name
        assert_within_torch_error(a, t, r, name=name, atol=ATOL[dtype] * 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_qk_under_autocast(dtype):
    """q and k out of Linears under autocast, rotated by kernels.apply_rope_qk with the triton and the torch
    backend in the same autocast (cos/sin in the autocast dtype, as LlamaAttention.qkv computes them)."""
    from staged_fast import kernels

    B, T, d, nh, nkv, hd = 2, 37, 48, 6, 2, 64
    gen = torch.Generator(device="cpu").manual_seed(8)
    q_proj = torch.nn.Linear(d, nh * hd, bias=False).to(DEVICE)
    k_proj = torch.nn.Linear(d, nkv * hd, bias=False).to(DEVICE)
    h = torch.randn(B, T, d, generator=gen).to(DEVICE)
    grad_q, grad_k = (torch.randn(B, T, n, hd, generator=gen).to(DEVICE) for n in (nh, nkv))
    params = [q_proj.weight, k_proj.weight]

    def run(backend):
        with torch.autocast(DEVICE, dtype=dtype):
            q, k = q_proj(h).view(B, T, nh, hd), k_proj(h).view(B, T, nkv, hd)
            cos, sin = _cos_sin(T, hd, q.dtype)
            q_rot, k_rot = kernels.apply_rope_qk(q, k, cos, sin, backend)
        ((q_rot.float() * grad_q).sum() + (k_rot.float() * grad_k).sum()).backward(inputs=params)
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return (q, k), (q_rot, k_rot), (cos, sin), grads

    with poisoned_outputs():
        (q, k), outs, (cos, sin), grads = run("triton")
    _, ref_outs, _, ref_grads = run("torch")
    ref64 = [kernels.rope_torch(x.detach().double(), cos.double(), sin.double()) for x in (q, k)]
    for name, a, t, r in zip(("q_rot", "k_rot"), outs, ref_outs, ref64):
        assert a.dtype == dtype and t.dtype == dtype
        assert_within_torch_error(a, t, r, name=name, atol=ATOL[dtype] * 4)
    for name, a, r in zip(("dq_proj", "dk_proj"), grads, ref_grads):
        err = ((a - r).norm() / r.norm()).item()
        assert err < (2e-2 if dtype == torch.bfloat16 else 4e-3), f"{name}: relative error {err:.2e}"


def test_rope_qk_compiled_path_equals_eager_path_and_opcheck():
    from staged_fast.kernels.rope import rope_qk

    gen = torch.Generator(device="cpu").manual_seed(9)
    T, hd = 37, 64
    q, k = (t.requires_grad_() for t in _qk_views(2, T, 6, 2, hd, torch.float32, gen))
    cos, sin = _cos_sin(T, hd, torch.float32)
    grads = [torch.randn(2, h, T, hd, generator=gen).to(DEVICE).transpose(1, 2) for h in (6, 2)]

    def fn(q, k):
        return rope_qk(q, k, cos, sin)

    eager = _run(fn, (q, k), grads, [q, k])
    compiled = _run(torch.compile(fn, backend="aot_eager", fullgraph=True), (q, k), grads, [q, k])
    for a, c in zip(eager[0] + eager[1], compiled[0] + compiled[1]):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.staged_fast.rope_qk.default, (q, k, cos, sin, False), test_utils=utils)
