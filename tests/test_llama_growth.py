"""Llama growth: width doubling (d, heads, kv heads, SwiGLU hidden) and every depth mode, function-preserving
with AdamW state, through the same index maps and fused op as GPT-2; fused vs reference bit-equal."""

import pytest
import torch

from staged_fast import GPT, GPTConfig
from staged_fast.config import preset_config
from staged_fast.growth import GROWTH_OPS, grow_model, growth_plan
from staged_fast.growth import index_maps as im
from test_growth_operators import batch, clone  # the GPT-2 growth tests' helpers

# n_kv_head < n_head, head_dim 96, odd layer counts, untied heads, MHA (n_kv == n_head).
SHAPES = [
    dict(n_layer=3, n_embd=192, n_head=2, n_kv_head=1, intermediate_size=320),  # head_dim 96, GQA, odd depth
    dict(n_layer=1, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=192, tie_embeddings=False),
    dict(n_layer=2, n_embd=48, n_head=3, n_kv_head=3, intermediate_size=128, rope_theta=500.0),  # head_dim 16
]
IDS = ["3L192d2H1KV", "1L64d4H2KV_untied", "2L48d3H3KV"]


def make(shape, seed=0, vocab=61, n_positions=16, steps=2, dtype=torch.float32, lr=1e-2):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, n_positions=n_positions, dropout=0.0, attn_dropout=0.0, arch="llama", **shape)
    model = GPT(cfg).to(dtype)
    # non-trivial norm weights, so duplication of gamma is exercised
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    x, y = batch(cfg, seed)
    for _ in range(steps):
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    return model, opt


@torch.no_grad()
def outputs(model, x, y):
    """Logits and the loss computed from them in their own dtype (the training loss path upcasts to fp32)."""
    model.eval()
    logits = model(x)
    return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()


def test_llama_model_basics():
    cfg = preset_config("llama_tiny", vocab_size=50, n_positions=32)
    m = GPT(cfg)
    assert type(m).__name__ == "Llama" and isinstance(m, GPT)
    assert cfg.shape_str() == "2L/128d/4H/2KV/384F"
    assert m.num_params() == cfg.n_params_non_embedding
    assert not any(n.endswith(".bias") for n, _ in m.named_parameters())
    assert m.lm_head.weight is m.transformer.wte.weight
    untied = GPT(cfg.replace(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert GPTConfig(n_embd=128, n_head=2, arch="llama").intermediate_size == 320  # multiple of 64 near 341
    for name in ("llama_tiny", "llama_small", "llama_base", "llama_large"):
        full = preset_config(name)
        assert preset_config(name + "_div2_depth").replace(n_layer=full.n_layer).same_shape(full)
        assert growth_plan(preset_config(name + "_div2_width"), full) == ["width"]
    assert growth_plan(preset_config("llama_large_div4_width"), preset_config("llama_large")) == ["width", "width"]


@pytest.mark.parametrize("dst,why", [
    (dict(n_kv_head=4), "doubling gives 2L/128d/4H/2KV/384F"),  # only n_kv_head off: it was planned as one width
    (dict(intermediate_size=512), "doubling gives 2L/128d/4H/2KV/384F"),
    (dict(arch="gpt2"), "growth keeps the architecture"),
])
def test_a_plan_is_refused_when_doubling_does_not_reach_the_target(dst, why):
    from staged_fast.growth import GrowthError

    src = GPTConfig(n_layer=2, n_embd=64, n_head=2, n_kv_head=1, intermediate_size=192, vocab_size=50, arch="llama")
    target = dict(n_layer=2, n_embd=128, n_head=4, n_kv_head=2, intermediate_size=384, vocab_size=50, arch="llama")
    assert growth_plan(src, GPTConfig(**target)) == ["width"]
    if dst.get("arch") == "gpt2":
        target = dict(n_layer=2, n_embd=128, n_head=4, vocab_size=50)
    with pytest.raises(GrowthError, match=why):
        growth_plan(src, GPTConfig(**{**target, **dst}))


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("op", GROWTH_OPS[:1] + ("alternate_id", "append_id"))
def test_function_preserving_fp64(shape, op):
    model, opt = make(shape, dtype=torch.float64)
    x, y = batch(model.config, 1)
    logits, loss = outputs(model, x, y)
    grown, gopt = grow_model(*clone(model, opt), op)
    glogits, gloss = outputs(grown, x, y)
    assert abs(gloss - loss) <= 1e-12 * abs(loss)
    assert (glogits - logits).abs().max().item() <= 1e-12 * logits.abs().max().item()
    assert len(gopt.state) == len(list(grown.parameters()))
    if op == "width":
        c = model.config
        assert (grown.config.n_head, grown.config.n_kv_head, grown.config.intermediate_size) == (
            2 * c.n_head, 2 * c.n_kv_head, 2 * c.intermediate_size)
        assert grown.config.tie_embeddings == c.tie_embeddings
        assert (grown.lm_head.weight is grown.transformer.wte.weight) == c.tie_embeddings


@pytest.mark.parametrize("shape", SHAPES[:2], ids=IDS[:2])
@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_width_fp32_and_noise(shape, noise):
    model, opt = make(shape)
    x, y = batch(model.config, 1)
    logits, loss = outputs(model, x, y)
    grown, _ = grow_model(*clone(model, opt), "width", width_noise=noise)
    glogits, gloss = outputs(grown, x, y)
    assert ((glogits - logits).abs().max() / logits.abs().max()).item() < 1e-5
    assert abs(gloss - loss) <= 1e-5 * abs(loss)


@pytest.mark.parametrize("op", ["width", "alternate_id", "append_copy"])
def test_fused_and_reference_bit_equal(op):
    model, opt = make(SHAPES[0])
    a, oa = grow_model(*clone(model, opt), op, backend="fused", width_noise=0.01 if op == "width" else 0.0)
    b, ob = grow_model(*clone(model, opt), op, backend="reference", width_noise=0.01 if op == "width" else 0.0)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(oa.state[pa][k], ob.state[pb][k]), (na, k)


def test_width_state_scales_and_one_step_matches_small_model():
    """Adam state grown like GPT-2's: copied elements move by the small model's AdamW update of their source."""
    lr, eps = 1e-2, 1e-12
    model, opt = make(SHAPES[1], lr=lr)
    for g in opt.param_groups:
        g["eps"], g["weight_decay"] = eps, 0.0
    small, sopt = clone(model, opt)
    big, bopt = grow_model(*clone(model, opt), "width")
    for g in bopt.param_groups:
        assert g["eps"] == eps
    small.train(), big.train()
    x, y = batch(model.config, 5)
    before_s = {n: p.detach().clone() for n, p in small.named_parameters()}
    before_b = {n: p.detach().clone() for n, p in big.named_parameters()}
    for m, o in ((small, sopt), (big, bopt)):
        o.zero_grad()
        m(x, y).backward()
    sopt.step(), bopt.step()
    E = model.config.n_embd
    big_params = dict(big.named_parameters())
    for n, p in small.named_parameters():
        rule = im.width_rule(n, tuple(p.shape), E)
        idx, diagonal, _ = im.gather_index(rule.tiling)
        delta_b = (big_params[n].detach() - before_b[n]).reshape(-1)
        delta_s = (p.detach() - before_s[n]).reshape(-1)[idx.clamp(min=0)]
        torch.testing.assert_close(delta_b[diagonal], delta_s[diagonal], rtol=1e-3, atol=1e-3 * lr, msg=n)


def test_depth_id_zeroes_residual_outputs_and_state():
    model, opt = make(SHAPES[0])
    grown, gopt = grow_model(model, opt, "append_id")
    assert grown.config.n_layer == 6
    for i in range(3, 6):
        inserted = grown.transformer.h[i]
        for p in (inserted.attn.c_proj.weight, inserted.mlp.c_proj.weight):
            assert not p.any() and not gopt.state[p]["exp_avg"].any()
        assert inserted.attn.q_proj.weight.any()


def test_composition_width_then_depth_then_width():
    model, opt = make(SHAPES[1], dtype=torch.float64)
    x, y = batch(model.config, 1)
    _, loss = outputs(model, x, y)
    for op in ("width", "alternate_id", "width"):
        model, opt = grow_model(model, opt, op)
    _, gloss = outputs(model, x, y)
    assert abs(gloss - loss) <= 1e-12 * abs(loss)
    assert model.config.shape_str() == "2L/256d/16H/8KV/768F"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_grown_optimizer_lists_parameters_in_model_order(arch):
    """A checkpoint stores the optimizer's parameter order and a resume requires the model's order; depth growth
    used to list each original layer's parameters next to its copy's (a grown checkpoint then failed to resume)."""
    extra = dict(arch="llama", n_kv_head=1) if arch == "llama" else {}
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=40, n_positions=8, **extra)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters())
    for op in ("alternate_id", "width", "append_copy"):
        model, opt = grow_model(model, opt, op)
        names = {id(p): n for n, p in model.named_parameters()}
        assert [names[id(p)] for g in opt.param_groups for p in g["params"]] == [n for n, _ in model.named_parameters()]
