"""The CPU training path of the LM-head loss (staged_fast/kernels/cpu_linear_ce.py) against F.linear +
F.cross_entropy: loss and gradients under the tolerance rule of tests/README.md, the routing that decides when
it serves, and the tied embedding whose gradient rows go into the head's gradient in place."""
import copy

import pytest
import torch
import torch.nn.functional as F

from staged_fast import kernels
from staged_fast.config import GPTConfig
from staged_fast.kernels import cpu_linear_ce
from staged_fast.kernels._common import assert_within_torch_error
from staged_fast.model import GPT

SHAPES = [(70, 64, 1000), (37, 96, 2053)]


@pytest.fixture(autouse=True, params=["one_block", "many_blocks"])
def vocab_blocks(request, monkeypatch):
    """Every test runs with the vocabulary in one block and in several of 256 rows (the last one partial),
    as GPT-2's 50257 rows are at training shapes."""
    if request.param == "many_blocks":
        monkeypatch.setattr(cpu_linear_ce, "BLOCK_BYTES", 1)
    return request.param


def _inputs(n, d, v, dtype, seed=0, ignore_every=7):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.5 * 2  # logits ~ N(0, 4): a peaked softmax
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::ignore_every] = -100
    return hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), targets


def _plain(h, w, t, ignore_index=-100):
    return F.cross_entropy(F.linear(h, w), t, ignore_index=ignore_index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_linear_ce_matches_float64(shape, dtype):
    h, w, t = _inputs(*shape, dtype)
    scale = torch.tensor(3.0, dtype=dtype)  # a loss scale != 1 reaches both gradients
    loss = cpu_linear_ce.linear_cross_entropy_cpu(h, w, t)
    grads = torch.autograd.grad(loss, (h, w), scale)
    torch_loss = _plain(h, w, t)
    torch_grads = torch.autograd.grad(torch_loss, (h, w), scale)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _plain(h64, w64, t)
    ref_grads = torch.autograd.grad(ref, (h64, w64), scale.double())
    atol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    assert_within_torch_error(loss, torch_loss, ref, name="loss", atol=atol * ref.abs().item())
    for name, ours, theirs, r in zip(("grad_hidden", "grad_weight"), grads, torch_grads, ref_grads):
        assert ours.dtype == dtype
        assert_within_torch_error(ours, theirs, r, name=name, atol=atol * r.abs().max().item())


def test_cpu_linear_ce_ignore_index_like_torch():
    h, w, t = _inputs(37, 96, 2053, torch.float64)
    t_custom = t.clone()
    t_custom[t == -100] = 5  # class 5 ignored instead of -100
    for targets, ii in ((t_custom, 5), (torch.full_like(t, -100), -100)):
        ours = cpu_linear_ce.linear_cross_entropy_cpu(h, w, targets, ignore_index=ii)
        ref = _plain(h, w, targets, ignore_index=ii)
        if torch.isnan(ref):
            assert torch.isnan(ours)  # nothing counted: 0/0, as F.cross_entropy
        else:
            torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
            for a, b in zip(torch.autograd.grad(ours, (h, w)), torch.autograd.grad(ref, (h, w))):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_routing_uses_the_cpu_path_only_for_fp32_fp64_training(monkeypatch):
    calls = []
    real = cpu_linear_ce.linear_cross_entropy_cpu
    monkeypatch.setattr(cpu_linear_ce, "linear_cross_entropy_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    h, w, t = _inputs(70, 64, 1000, torch.float32)
    ref = _plain(h, w, t)
    torch.testing.assert_close(kernels.linear_cross_entropy(h, w, t), ref, rtol=1e-5, atol=1e-6)
    assert calls == [1]
    with torch.no_grad():  # evaluation: the plain path, no gradient buffer
        kernels.linear_cross_entropy(h, w, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernels.linear_cross_entropy(h, w, t)
    kernels.linear_cross_entropy(h.detach().bfloat16().requires_grad_(), w.detach().bfloat16(), t)
    assert calls == [1]


def _tiny(tied=True, arch="gpt2", dropout=0.0):
    cfg = GPTConfig(n_layer=2, n_embd=96, n_head=1, vocab_size=2053, n_positions=40, dropout=dropout,
                    attn_dropout=dropout, tie_embeddings=tied, arch=arch)
    torch.manual_seed(0)
    return GPT(cfg).double()


def _plain_loss(model, x, y):
    """The model's loss through plain torch ops (nn.Embedding's dense gradient, full logits)."""
    h = model.hidden_states(x)
    return F.cross_entropy(model.lm_head(h).flatten(0, 1), y.flatten())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("tied,arch", [(True, "gpt2"), (False, "gpt2"), (True, "llama")])
def test_model_gradients_match_the_plain_path(tied, arch, dropout):
    """Tied: the embedding's gradient rows are added into the head's gradient in place (duplicated tokens
    included); untied: only the transposed loss. Two backwards: the second accumulates onto .grad. With
    dropout on, both paths draw the same masks (the loss itself draws no random numbers)."""
    ours = _tiny(tied, arch, dropout)
    plain = copy.deepcopy(ours)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 2053, (3, 37), generator=g)
    x[1, :5] = x[0, 3]  # one token many times across rows
    y = torch.randint(0, 2053, (3, 37), generator=g)
    y[2, ::5] = -100
    for step in range(2):
        torch.manual_seed(10 + step)
        loss = ours(x, y)
        loss.backward()
        torch.manual_seed(10 + step)
        ref = _plain_loss(plain, x, y)
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-13, atol=1e-13)
        for (name, p), q in zip(ours.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-15, msg=name)


def test_tied_head_gradient_is_the_parameter_gradient_without_a_copy(monkeypatch):
    """The head's weight gradient buffer becomes wte.grad itself: no dense (V, d) zero fill, no add, no clone."""
    model = _tiny()
    made = []
    real = cpu_linear_ce.TransposedLinearCrossEntropy.backward

    def spy(ctx, grad_loss):
        out = real(ctx, grad_loss)
        made.append(out[1].data_ptr())
        return out

    monkeypatch.setattr(cpu_linear_ce.TransposedLinearCrossEntropy, "backward", staticmethod(spy))
    x = torch.randint(0, 2053, (2, 30))
    model(x, x).backward()
    assert made == [model.transformer.wte.weight.grad.data_ptr()]


def test_tied_embedding_frozen_or_autocast_or_no_grad():
    model = _tiny()
    x = torch.randint(0, 2053, (2, 30))
    with torch.no_grad():  # evaluation: the plain path (its CE runs on fp32 logits)
        torch.testing.assert_close(model(x, x), _plain_loss(model, x, x).float(), rtol=1e-6, atol=1e-6)
    model.transformer.wte.weight.requires_grad_(False)  # frozen embedding and head: blocks still train
    loss = model(x, x)
    loss.backward()
    assert model.transformer.wte.weight.grad is None and model.transformer.h[0].attn.c_attn.weight.grad is not None
    for dtype in (torch.bfloat16, torch.float16):  # autocast: the plain path, gradients and all
        model = _tiny().float()
        plain = copy.deepcopy(model)
        with torch.autocast("cpu", dtype=dtype):
            loss = model(x, x)
            ref = _plain_loss(plain, x, x).float()
        loss.backward()
        ref.backward()
        torch.testing.assert_close(loss, ref)
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=f"{dtype} {name}")


def test_head_without_its_embedding_falls_back_to_a_dense_gradient():
    """A tied embedding whose head never ran backward (a graph through the embedding alone) still gets its
    ordinary dense gradient."""
    w = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[1, 2, 2, 7]])
    out = cpu_linear_ce.tied_embedding(w, idx, cpu_linear_ce.HeadGradLink())
    (out * torch.arange(8.0, dtype=torch.float64)).sum().backward()
    ref_w = w.detach().clone().requires_grad_()
    (F.embedding(idx, ref_w) * torch.arange(8.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=0, atol=0)
