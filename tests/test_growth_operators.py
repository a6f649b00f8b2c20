"""Model + optimizer growth: function preservation, training dynamics, composition, bad inputs."""
import copy
import dataclasses

import pytest
import torch

from staged_fast import GPT, GPTConfig
from staged_fast.config import preset_config
from staged_fast.growth import GROWTH_OPS, GrowthError, grow_model, growth_plan
from staged_fast.growth import index_maps as im

# Random shapes incl. head_dim 96 (the paper's presets) and the paper's presets scaled down in depth,
# vocab and context (width as the preset's div4 ratio).
SHAPES = [
    dict(n_layer=2, n_embd=96, n_head=1),  # head_dim 96
    dict(n_layer=3, n_embd=192, n_head=2),  # head_dim 96, odd depth
    dict(n_layer=1, n_embd=40, n_head=5),  # head_dim 8
    dict(n_layer=2, n_embd=384 // 4, n_head=4 // 4),  # GPT2_base_div2_width / 4
]


def make(shape, seed=0, vocab=97, n_positions=24, steps=2, lr=1e-2, weight_decay=0.1):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, n_positions=n_positions, dropout=0.0, attn_dropout=0.0, **shape)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    x, y = batch(cfg, seed)
    for _ in range(steps):
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    return model, opt


def batch(cfg, seed=0, B=2):
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randint(0, cfg.vocab_size, (B, cfg.n_positions), generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, cfg.n_positions), generator=g)
    return x, y


def clone(model, opt):
    m = copy.deepcopy(model)
    o = torch.optim.AdamW(m.parameters())
    o.load_state_dict(opt.state_dict())
    return m, o


def rel_logit_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def outputs(model, x, y):
    model.eval()
    return model(x), model(x, y).item()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s['n_layer']}L{s['n_embd']}d{s['n_head']}H")
@pytest.mark.parametrize("op,noise", [("width", 0.0), ("width", 0.02), ("alternate_id", 0.0), ("append_id", 0.0)])
def test_function_preserving(shape, op, noise):
    model, opt = make(shape)
    x, y = batch(model.config, 1)
    logits, loss = outputs(model, x, y)
    grown, gopt = grow_model(*clone(model, opt), op, width_noise=noise)
    glogits, gloss = outputs(grown, x, y)
    assert rel_logit_diff(glogits, logits) < 1e-5
    assert abs(gloss - loss) <= 1e-5 * abs(loss)
    assert len(gopt.state) == len(list(grown.parameters()))


@pytest.mark.parametrize("op", ["alternate_copy", "append_copy"])
def test_copy_depth_changes_the_function(op):
    model, opt = make(SHAPES[0])
    x, y = batch(model.config, 1)
    logits, loss = outputs(model, x, y)
    grown, _ = grow_model(*clone(model, opt), op)
    glogits, gloss = outputs(grown, x, y)
    assert rel_logit_diff(glogits, logits) > 1e-2 and abs(gloss - loss) > 1e-3


def test_width_noise_breaks_symmetry_and_is_deterministic():
    model, opt = make(SHAPES[0])
    g1, _ = grow_model(*clone(model, opt), "width", width_noise=0.01, generator=torch.Generator().manual_seed(3))
    g2, _ = grow_model(*clone(model, opt), "width", width_noise=0.01, generator=torch.Generator().manual_seed(3))
    g3, _ = grow_model(*clone(model, opt), "width", width_noise=0.01, generator=torch.Generator().manual_seed(4))
    plain, _ = grow_model(*clone(model, opt), "width")
    w = lambda m: m.transformer.h[0].mlp.c_fc.weight  # noqa: E731
    assert torch.equal(w(g1), w(g2)) and not torch.equal(w(g1), w(g3))
    E = model.config.n_embd
    assert torch.equal(w(plain)[: 4 * E, E:], torch.zeros(4 * E, E))  # without noise: block diagonal
    assert w(g1)[: 4 * E, E:].abs().min() > 0  # with noise: every block row split [W - E, E]


def test_one_adamw_step_matches_the_small_models_step():
    """After width growth, gradients of copied elements are grad_scale x the small model's and every
    copied element moves by exactly the small model's AdamW update of its source (m/sqrt(v) preserved).
    Tolerance: gradients rtol 1e-4; updates rtol 1e-3 / atol 1e-3 * lr, i.e. 0.1% of one Adam step (fp32
    reduction order of the 2x wider matmuls; elements whose gradient is ~1e-7 with v ~ 1e-14 carry
    ~1e-4 relative gradient error straight into m/sqrt(v)). Adam's eps
    is 1e-12 here: it enters as sqrt(v/4) + eps against sqrt(v) + eps, which with the default 1e-8 and
    the tiny v of layer-norm weights early in training moves their update by ~0.3%. weight_decay is 0 here: decoupled decay acts on
    the grown value, which differs from its source for ln_f (halved). Off-diagonal (zero) tiles start
    with zero Adam state: they get the gradient too and take Adam's first step from zero state.
    """
    lr, betas, eps = 1e-2, (0.9, 0.95), 1e-12
    model, opt = make(SHAPES[1], lr=lr, weight_decay=0.0)
    for g in opt.param_groups:
        g["betas"], g["eps"] = betas, eps
    small, sopt = clone(model, opt)
    big, bopt = grow_model(*clone(model, opt), "width")
    small.train(), big.train()
    x, y = batch(model.config, 5)
    before_s = {n: p.detach().clone() for n, p in small.named_parameters()}
    before_b = {n: p.detach().clone() for n, p in big.named_parameters()}
    for m, o in ((small, sopt), (big, bopt)):
        o.zero_grad()
        m(x, y).backward()
    E = model.config.n_embd
    step = int(bopt.state[big.transformer.wte.weight]["step"].item()) + 1
    for n, p in small.named_parameters():
        rule = im.width_rule(n, tuple(p.shape), E)
        # every tile, off-diagonal ones included, gets grad_scale x the gradient of its block's source
        idx, _, _ = im.gather_index(dataclasses.replace(rule.tiling, block_diagonal=False))
        gb = dict(big.named_parameters())[n].grad.reshape(-1)
        gs = p.grad.reshape(-1)[idx] * rule.grad_scale
        torch.testing.assert_close(gb, gs, rtol=1e-4, atol=1e-7, msg=f"gradient of {n}")
    sopt.step(), bopt.step()
    for n, p in small.named_parameters():
        rule = im.width_rule(n, tuple(p.shape), E)
        idx, diagonal, _ = im.gather_index(rule.tiling)
        pb = dict(big.named_parameters())[n]
        delta_b = (pb.detach() - before_b[n]).reshape(-1)
        delta_s = (p.detach() - before_s[n]).reshape(-1)[idx.clamp(min=0)]
        if n.endswith("c_attn.bias"):  # the key bias: softmax ignores it, its gradient is rounding noise
            diagonal = diagonal & ((idx < E) | (idx >= 2 * E))
        torch.testing.assert_close(delta_b[diagonal], delta_s[diagonal], rtol=1e-3, atol=1e-3 * lr, msg=n)
        if (idx < 0).any():  # zero tiles: Adam's step from zero state with bias correction at `step`
            g = pb.grad.reshape(-1)[idx < 0]
            m_hat = (1 - betas[0]) * g / (1 - betas[0] ** step)
            v_hat = (1 - betas[1]) * g * g / (1 - betas[1] ** step)
            torch.testing.assert_close(delta_b[idx < 0], -lr * m_hat / (v_hat.sqrt() + eps), rtol=1e-4, atol=1e-7)


def test_depth_inserted_layer_state():
    model, opt = make(SHAPES[0])
    old_block = model.transformer.h[1]
    old_m = opt.state[old_block.attn.c_attn.weight]["exp_avg"].clone()
    old_w = old_block.attn.c_attn.weight.detach().clone()
    grown, gopt = grow_model(model, opt, "alternate_id")
    inserted, original = grown.transformer.h[3], grown.transformer.h[2]
    assert torch.equal(original.attn.c_attn.weight, old_w) and torch.equal(inserted.attn.c_attn.weight, old_w)
    assert torch.equal(gopt.state[inserted.attn.c_attn.weight]["exp_avg"], old_m)  # copied weight, copied state
    for p in (inserted.attn.c_proj.weight, inserted.attn.c_proj.bias, inserted.mlp.c_proj.weight, inserted.mlp.c_proj.bias):
        assert not p.any() and not gopt.state[p]["exp_avg"].any() and not gopt.state[p]["exp_avg_sq"].any()
    assert inserted.attn.c_attn.weight.data_ptr() != original.attn.c_attn.weight.data_ptr()


@pytest.mark.parametrize("path", [["append_id", "width"], ["width", "width"], ["width", "alternate_id", "width"]])
def test_composition(path):
    model, opt = make(dict(n_layer=1, n_embd=32, n_head=1))
    config0 = model.config
    x, y = batch(model.config, 1)
    logits, _ = outputs(model, x, y)
    for op in path:
        model, opt = grow_model(model, opt, op)
    assert rel_logit_diff(outputs(model, x, y)[0], logits) < 1e-5
    depth_mode = next((op for op in path if op != "width"), "alternate_id")
    assert growth_plan(config0, model.config, depth_mode) == sorted(
        path, key=lambda op: op == "width")
    # A training step still works on the grown model and optimizer.
    model.train()
    opt.zero_grad()
    model(x, y).backward()
    opt.step()


def test_width_twice_reaches_large_from_div4_width():
    assert growth_plan(preset_config("GPT2_large_div4_width"), preset_config("GPT2_large")) == ["width", "width"]
    assert growth_plan(preset_config("GPT2_large_div4_depth"), preset_config("GPT2_large"),
                       "append_id") == ["append_id", "append_id"]


def test_new_optimizer_keeps_hyperparameters_groups_and_step_override():
    model, _ = make(SHAPES[2], steps=0)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-6)
    x, y = batch(model.config)
    model(x, y).backward()
    opt.step()
    grown, gopt = grow_model(model, opt, "width", optimizer_step=1000)
    assert [g["weight_decay"] for g in gopt.param_groups] == [0.1, 0.0]
    assert all(g["lr"] == 3e-3 and g["betas"] == (0.9, 0.95) and g["eps"] == 1e-6 for g in gopt.param_groups)
    assert [len(g["params"]) for g in gopt.param_groups] == [len(decay), len(no_decay)]
    assert all(s["step"].item() == 1000 for s in gopt.state.values())
    assert grown.training and grown.kernels_backend == model.kernels_backend


def test_no_optimizer_or_no_state_grows_weights_only():
    model, _ = make(SHAPES[2], steps=0)
    grown, none = grow_model(copy.deepcopy(model), None, "width")
    assert none is None and grown.config.n_embd == 80
    grown, fresh = grow_model(model, torch.optim.AdamW(model.parameters()), "append_id")
    assert len(fresh.state) == 0 and grown.config.n_layer == 2
    assert grown.lm_head.weight is grown.transformer.wte.weight


def test_bad_inputs():
    model, opt = make(SHAPES[2], steps=1)
    with pytest.raises(GrowthError, match="valid ops: width, alternate_copy, append_copy, alternate_id, append_id"):
        grow_model(model, opt, "height")
    with pytest.raises(GrowthError, match="not the requested"):
        grow_model(model, opt, "width", target=model.config.replace(n_embd=120, n_head=15))
    with pytest.raises(GrowthError, match="power of two"):
        growth_plan(model.config, model.config.replace(n_layer=3))
    with pytest.raises(GrowthError, match="head_dim"):
        growth_plan(model.config, model.config.replace(n_embd=80, n_head=5))
    other = GPT(model.config)
    with pytest.raises(GrowthError, match="optimizer parameter mismatch"):
        grow_model(model, torch.optim.AdamW(other.parameters()), "width")
    with pytest.raises(GrowthError, match="width_noise applies to width"):
        grow_model(model, opt, "append_id", width_noise=0.1)
    # The failed calls consumed nothing.
    grown, _ = grow_model(model, opt, "width")
    assert grown.config.n_embd == 80 and GROWTH_OPS[0] == "width"
