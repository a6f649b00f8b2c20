"""End to end: a tiny GPT trained with the Triton kernels tracks the torch path's loss curve.

Same init, same batches, dropout 0 (with dropout the two backends draw different masks). On CPU the
kernels run under TRITON_INTERPRET=1; on CUDA they are compiled and the model is bigger.
"""
import copy
import pytest
import torch

CUDA = torch.cuda.is_available()
# Without CUDA, tests/conftest.py has set TRITON_INTERPRET=1 before this module (and Triton) is imported.

from staged_fast.config import GPTConfig
from staged_fast.model import GPT

DEVICE = "cuda" if CUDA else "cpu"
STEPS = 30


def _train(model, batches, lr=1e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    losses = []
    for x, y in batches:
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


def test_tiny_gpt_triton_tracks_torch():
    shape = dict(n_layer=2, n_embd=192, n_head=2, vocab_size=1000, n_positions=64) if CUDA else dict(
        n_layer=2, n_embd=128, n_head=2, vocab_size=512, n_positions=32
    )
    config = GPTConfig(**shape, dropout=0.0, attn_dropout=0.0)
    torch.manual_seed(0)
    base = GPT(config).to(DEVICE)
    g = torch.Generator(device="cpu").manual_seed(1)
    batch = 4 if CUDA else 1
    # Two fixed batches, alternating: the model memorizes them, so the loss falls far in 30 steps and
    # the curves are compared over a real trajectory, not around the initial loss.
    data = [torch.randint(0, config.vocab_size, (batch, config.n_positions + 1), generator=g) for _ in range(2)]
    batches = [(d[:, :-1].to(DEVICE), d[:, 1:].to(DEVICE)) for d in data] * (STEPS // 2)
    ref_model, tri_model = copy.deepcopy(base), copy.deepcopy(base)
    ref_model.set_kernels("torch")
    tri_model.set_kernels("triton")
    ref = _train(ref_model, batches)
    tri = _train(tri_model, batches)
    assert ref[-4:].mean() < ref[:4].mean() - 1.0, f"the torch path did not learn: {ref.tolist()}"
    diff = (tri - ref).abs().max().item()
    print(f"loss {ref[0]:.4f} -> {ref[-1]:.4f}; max |triton - torch| = {diff:.2e}")
    assert diff < 1e-3, f"loss curves differ by {diff:.2e}: triton {tri.tolist()} vs torch {ref.tolist()}"


def test_training_with_attention_dropout_runs_in_kernel():
    """config.attn_dropout > 0 in train mode: the Triton path applies dropout (no fallback, no error)."""
    config = GPTConfig(n_layer=1, n_embd=64, n_head=1, vocab_size=64, n_positions=16, dropout=0.0, attn_dropout=0.5)
    torch.manual_seed(0)
    model = GPT(config, kernels_backend="triton").to(DEVICE)
    x = torch.randint(0, 64, (1, 16), device=DEVICE)
    model.eval()
    with torch.no_grad():
        eval_loss = model(x, x)
    model.train()
    torch.manual_seed(1)
    train_loss = model(x, x)
    train_loss.backward()
    assert torch.isfinite(train_loss) and train_loss.item() != eval_loss.item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_set_kernels_reaches_every_layer():
    model = GPT(GPTConfig(n_layer=2, n_embd=64, n_head=1, vocab_size=64, n_positions=16))
    model.set_kernels("triton")
    assert model.transformer.ln_f.backend == "triton"
    assert all(b.attn.backend == "triton" and b.ln_1.backend == "triton" for b in model.transformer.h)
    with pytest.raises(ValueError):
        model.set_kernels("auto")


def test_kernels_compile_as_single_ops_fullgraph():
    """torch.compile traces all three custom ops (with dropout's seed draw) without a graph break."""
    from staged_fast.kernels.attention import flash_attention
    from staged_fast.kernels.layernorm import layer_norm
    from staged_fast.kernels.fused_linear_ce import fused_linear_cross_entropy

    def f(x, w, b, q, wte, t):
        y = layer_norm(x, w, b, 1e-5)
        o = flash_attention(q, q, q, dropout_p=0.1)
        return fused_linear_cross_entropy(y.reshape(-1, 64), wte, t) + o.float().mean()

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 16, 64, generator=g).to(DEVICE).requires_grad_()
    w = torch.ones(64, device=DEVICE, requires_grad=True)
    b = torch.zeros(64, device=DEVICE, requires_grad=True)
    q = torch.randn(1, 2, 16, 64, generator=g).to(DEVICE).requires_grad_()
    wte = torch.randn(100, 64, generator=g).to(DEVICE).requires_grad_()
    t = torch.randint(0, 100, (32,), generator=g).to(DEVICE)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, b, q, wte, t)
    out.backward()
    assert torch.isfinite(out) and all(torch.isfinite(p.grad).all() for p in (x, w, b, q, wte))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_model_forward_backward_under_autocast_matches_torch(dtype):
    """What --bf16/--fp16 run: the whole model under autocast with the Triton kernels (attention output
    16-bit, residual stream fp32 into the fused residual layer norm), head_dim 96 and T=37 (not a
    multiple of any block), ignored targets. Loss and every parameter gradient against the torch backend
    under the same autocast (and plain fp32 for dtype=float32)."""
    config = GPTConfig(n_layer=2, n_embd=192, n_head=2, vocab_size=300, n_positions=48, dropout=0.0, attn_dropout=0.0)
    torch.manual_seed(0)
    base = GPT(config).to(DEVICE)
    g = torch.Generator(device="cpu").manual_seed(3)
    T = 37
    x = torch.randint(0, config.vocab_size, (2, T), generator=g).to(DEVICE)
    y = torch.randint(0, config.vocab_size, (2, T), generator=g)
    y[:, ::5] = -100
    y = y.to(DEVICE)

    def loss_and_grads(backend):
        model = copy.deepcopy(base)
        model.set_kernels(backend)
        with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x, y)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss_tri, grads_tri = loss_and_grads("triton")
    loss_ref, grads_ref = loss_and_grads("torch")
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    assert torch.isfinite(loss_tri) and abs(loss_tri - loss_ref) <= tol * loss_ref.abs(), (loss_tri, loss_ref)
    assert grads_tri.keys() == grads_ref.keys()
    for name, ref in grads_ref.items():
        got = grads_tri[name]
        assert got is not None and got.dtype == ref.dtype, name
        err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert err <= 3 * tol, f"{name}: relative gradient error {err:.2e} under {dtype}"


def test_model_compiles_fullgraph_with_the_custom_ops():
    """torch.compile of the whole model with the Triton kernels: each kernel is one custom op, so
    fullgraph=True (an error on any graph break) holds for forward and backward, under autocast too."""
    config = GPTConfig(n_layer=2, n_embd=64, n_head=1, vocab_size=128, n_positions=32, dropout=0.1, attn_dropout=0.1)
    torch.manual_seed(0)
    model = GPT(config, kernels_backend="triton").to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randint(0, 128, (2, 19), device=DEVICE)
    for dtype in (None, torch.bfloat16):
        with torch.autocast(DEVICE, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = compiled(x, x)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad(set_to_none=True)
