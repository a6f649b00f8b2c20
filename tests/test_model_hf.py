"""HF parity: our GPT and transformers' GPT2LMHeadModel agree on logits with the same weights."""
import pytest
import torch

from staged_fast.config import GPTConfig
from staged_fast.hf import from_hf, load_pretrained, save_pretrained, to_hf
from staged_fast.model import GPT

SHAPES = [
    dict(n_layer=2, n_embd=64, n_head=2),
    dict(n_layer=3, n_embd=192, n_head=2),  # head_dim 96, as the paper's presets
]


def _model(shape, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(**shape, vocab_size=1000, n_positions=64, dropout=0.0, attn_dropout=0.0)
    model = GPT(cfg).eval()
    with torch.no_grad():  # non-trivial layer norms and biases, so a mis-mapped tensor shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("shape", SHAPES)
def test_export_to_hf_matches_logits(shape):
    model = _model(shape)
    idx = torch.randint(0, 1000, (2, 37))
    hf = to_hf(model).eval()
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert _max_rel(ours, theirs) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_import_from_hf_matches_logits(shape):
    from transformers import GPT2LMHeadModel

    from staged_fast.hf import hf_config

    torch.manual_seed(1)
    cfg = GPTConfig(**shape, vocab_size=1000, n_positions=64, dropout=0.0, attn_dropout=0.0)
    hf = GPT2LMHeadModel(hf_config(cfg)).eval()
    ours = from_hf(hf).eval()
    idx = torch.randint(0, 1000, (3, 20))
    with torch.no_grad():
        assert _max_rel(ours(idx), hf(idx).logits) < 1e-5


def test_save_pretrained_folder_loads_with_auto(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(SHAPES[1])
    save_pretrained(model, tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    back = load_pretrained(tmp_path).eval()
    idx = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        assert _max_rel(hf(idx).logits, model(idx)) < 1e-5
        assert torch.equal(back(idx), model(idx))


def test_loss_is_mean_next_token_cross_entropy():
    model = _model(SHAPES[0])
    idx = torch.randint(0, 1000, (2, 12))
    tgt = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(idx).reshape(-1, 1000), tgt.reshape(-1))
        assert torch.allclose(model(idx, tgt), ref, rtol=1e-6)


def test_sequence_longer_than_positions_is_rejected():
    model = _model(SHAPES[0])
    with pytest.raises(ValueError, match="exceeds n_positions=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
