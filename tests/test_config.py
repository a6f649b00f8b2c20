import math

import pytest

from staged_fast.config import PRESETS, ConfigError, GPTConfig, initial_lr, preset_config

# The seed's LR table (gpt_pretrain.py runs), reproduced exactly by the log10 heuristic.
SEED_LR_TABLE = {
    "GPT2_base": 0.002132892651963921,
    "GPT2_base_div2_depth": 0.0021748863363590465,
    "GPT2_base_div2_width": 0.002216880020754172,
    "GPT2_large": 0.002006911598778545,
    "GPT2_large_div2_width": 0.002090898967568796,
    "GPT2_large_div2_depth": 0.0020489052831736704,
}


@pytest.mark.parametrize("name", list(SEED_LR_TABLE))
def test_lr_table_exact(name):
    cfg = preset_config(name)
    assert initial_lr(cfg.n_layer, cfg.n_embd) == SEED_LR_TABLE[name]


def test_paper_presets_have_head_dim_96():
    for name in [n for n in PRESETS if n.startswith("GPT2")]:
        cfg = preset_config(name)
        assert cfg.head_dim == 96, name


def test_preset_shapes():
    assert PRESETS["GPT2_large_div4_width"] == (24, 384, 4)
    assert PRESETS["GPT2_large_div4_depth"] == (6, 1536, 16)
    cfg = preset_config("GPT2_base")
    assert cfg.n_params_non_embedding == 12 * 12 * 768**2 == 84_934_656
    assert math.isclose(initial_lr(12, 768), SEED_LR_TABLE["GPT2_base"])


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="Unknown model size 'GPT5'.*GPT2_base"):
        preset_config("GPT5")


def test_heads_must_divide_width():
    with pytest.raises(ConfigError, match="not divisible by n_head=7"):
        GPTConfig(n_layer=2, n_embd=128, n_head=7)


def test_roundtrip_dict():
    cfg = preset_config("tiny", dropout=0.0)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("shape,message", [
    (dict(n_head=0, n_kv_head=2), "n_head must be a positive integer, got 0"),  # was a ZeroDivisionError
    (dict(n_head=0), "n_head must be a positive integer, got 0"),  # was about n_kv_head, which nobody set
    (dict(n_embd=64, n_head=3), "n_embd=64 is not divisible by n_head=3"),  # was "head_dim=21 is odd"
    (dict(n_embd=48, n_head=3, n_kv_head=2), "not a multiple of n_kv_head=2"),
    (dict(n_embd=36, n_head=4), "head_dim=9 is odd"),
])
def test_a_llama_shape_is_refused_for_what_is_wrong_with_it(shape, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig(**{"n_layer": 2, "n_embd": 64, "vocab_size": 50, "arch": "llama", **shape})
