"""Hugging Face GPT-2 import is exact or refused (issue 10).

Every GPT2Config option our GPT honours (activation_function, scale_attn_weights, scale_attn_by_inverse_layer_idx,
tie_word_embeddings=False, reorder_and_upcast_attn) imports with fp32 logits parity <= 1e-5 against transformers
(eager and sdpa attention) and exports back exactly; what it cannot honour (another model_type, cross-attention,
another FFN size or activation, missing or extra weights) is refused with HFImportError, exit 2 in the CLIs.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from staged_fast.checkpoint import load_model, save_checkpoint
from staged_fast.config import GPTConfig
from staged_fast.growth import GrowthError, grow_model
from staged_fast.hf import HFImportError, config_from_hf, from_hf, load_pretrained, save_pretrained, to_hf
from staged_fast.model import GPT
from staged_fast.sample import CachedDecoder

TOL = 1e-5
OPTIONS = {
    "gelu_new": dict(),
    "gelu": dict(activation_function="gelu"),
    "relu": dict(activation_function="relu"),
    "gelu_pytorch_tanh": dict(activation_function="gelu_pytorch_tanh"),
    "gelu_fast": dict(activation_function="gelu_fast"),
    "quick_gelu": dict(activation_function="quick_gelu"),
    "silu": dict(activation_function="silu"),
    "swish": dict(activation_function="swish"),
    "unscaled": dict(scale_attn_weights=False),
    "inverse_layer_idx": dict(scale_attn_by_inverse_layer_idx=True),
    "unscaled_inverse_layer_idx": dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True),
    "untied": dict(tie_word_embeddings=False),
    "reorder_and_upcast": dict(reorder_and_upcast_attn=True),
    "all": dict(activation_function="relu", scale_attn_by_inverse_layer_idx=True, tie_word_embeddings=False),
}
# the same function as the default (tanh GELU) or precision only: no visible difference to check
SAME_AS_DEFAULT = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "reorder_and_upcast")


def hf_gpt2(seed=0, attn="eager", vocab=97, **options):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=24, n_embd=64, n_layer=3, n_head=4, bos_token_id=0,
                     eos_token_id=0, **options)
    hf = GPT2LMHeadModel._from_config(cfg, attn_implementation=attn).eval()
    with torch.no_grad():  # large random weights, so every option changes the logits visibly
        for p in hf.parameters():
            p.normal_(0.0, 0.5)
    return hf


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_import_parity(name, attn):
    hf = hf_gpt2(attn=attn, **OPTIONS[name])
    ours = from_hf(hf).eval()
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        ref = hf(idx).logits
        diff = max_diff(ours(idx), ref)
        assert diff <= TOL, diff
        if name not in SAME_AS_DEFAULT:  # the option matters: a default model with the same weights is far off
            plain = GPT(ours.config.replace(activation_function="gelu_new", scale_attn_weights=True,
                                            scale_attn_by_inverse_layer_idx=False, tie_embeddings=True)).eval()
            state = {k: v for k, v in ours.state_dict().items() if k != "lm_head.weight"}
            plain.load_state_dict(dict(state, **{"lm_head.weight": state["transformer.wte.weight"]}))
            assert max_diff(plain(idx), ref) > 10 * TOL
    cfg = ours.config
    assert cfg.activation_function == OPTIONS[name].get("activation_function", "gelu_new")
    assert cfg.scale_attn_weights == OPTIONS[name].get("scale_attn_weights", True)
    assert cfg.scale_attn_by_inverse_layer_idx == OPTIONS[name].get("scale_attn_by_inverse_layer_idx", False)
    assert cfg.tie_embeddings == OPTIONS[name].get("tie_word_embeddings", True)
    if not cfg.tie_embeddings:
        assert ours.lm_head.weight.data_ptr() != ours.transformer.wte.weight.data_ptr()
        assert torch.equal(ours.lm_head.weight, hf.lm_head.weight)


@pytest.mark.parametrize("name", ["gelu", "relu", "silu", "unscaled", "inverse_layer_idx", "untied", "all"])
def test_export_folder_loads_in_transformers_and_back(tmp_path, name):
    hf = hf_gpt2(seed=1, **OPTIONS[name])
    ours = from_hf(hf).eval()
    save_pretrained(ours, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    for key, value in OPTIONS[name].items():
        assert written[key] == value, key
    again = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(again).__name__ == "GPT2LMHeadModel"
    back = load_pretrained(tmp_path).eval()
    assert back.config == ours.config
    idx = torch.randint(0, 97, (3, 24))
    with torch.no_grad():
        assert max_diff(again(idx).logits, ours(idx)) <= TOL
        assert max_diff(to_hf(ours).eval()(idx).logits, ours(idx)) <= TOL
        assert torch.equal(back(idx), ours(idx))  # the round trip is exact


@pytest.mark.parametrize("name", ["unscaled", "inverse_layer_idx", "all"])
def test_triton_backend_agrees(name):
    """The Triton attention kernel gets the other scales folded into q. On the GPU where there is one: a
    process that has CUDA imports the kernels compiled, and they refuse CPU tensors (interpreted on CPU
    otherwise, as tests/conftest.py sets up)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = hf_gpt2(seed=2, **OPTIONS[name])
    torch_model = from_hf(hf).to(device).eval()
    triton_model = from_hf(hf, kernels_backend="triton").to(device).eval()
    hf = hf.to(device)
    idx = torch.randint(0, 97, (1, 24)).to(device)
    with torch.no_grad():
        ref = hf(idx).logits
        assert max_diff(torch_model(idx), ref) <= TOL
        assert max_diff(triton_model(idx), ref) <= 1e-4


@pytest.mark.parametrize("name", ["unscaled", "inverse_layer_idx", "untied", "silu"])
def test_cached_sampling_equals_full_forward(name):
    model = from_hf(hf_gpt2(seed=3, **OPTIONS[name])).eval()
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 97, (2, 5), generator=g)
    dec = CachedDecoder(model)
    with torch.no_grad():
        logits = dec.prefill(seq)
        for _ in range(6):
            torch.testing.assert_close(logits, model(seq)[:, -1], atol=2e-5, rtol=1e-5)
            nxt = torch.randint(0, 97, (2,), generator=g)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            logits = dec.step(nxt)


def test_checkpoint_round_trip_and_old_configs(tmp_path):
    model = from_hf(hf_gpt2(seed=4, **OPTIONS["all"])).eval()
    ckpt = save_checkpoint(tmp_path / "run", step=1, model=model, config=model.config)
    again = load_model(ckpt)
    assert again.config == model.config and not again.config.tie_embeddings
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(again(idx), model(idx))
    old = {k: v for k, v in GPTConfig().to_dict().items()  # a config saved before these options existed
           if k not in ("activation_function", "scale_attn_weights", "scale_attn_by_inverse_layer_idx")}
    cfg = GPTConfig.from_dict(old)
    assert (cfg.activation_function, cfg.scale_attn_weights, cfg.scale_attn_by_inverse_layer_idx) == (
        "gelu_new", True, False)


def test_config_refuses_what_the_model_cannot_compute():
    from staged_fast.config import ConfigError

    with pytest.raises(ConfigError, match="activation_function='mish' is not supported"):
        GPTConfig(activation_function="mish")
    with pytest.raises(ConfigError, match="apply to --arch gpt2 only"):
        GPTConfig(arch="llama", n_embd=64, n_head=4, scale_attn_weights=False)


# ------------------------------------------------------------------------------------------ growth
def _grown_logits_match(model, op):
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        before = model(idx)
    grown, _ = grow_model(model, None, op, backend="reference")
    with torch.no_grad():
        return max_diff(grown.eval()(idx), before), grown


@pytest.mark.parametrize("op", ["width", "append_id", "alternate_id"])
def test_growth_keeps_the_options_exact(op):
    model = from_hf(hf_gpt2(seed=5, activation_function="relu", scale_attn_weights=False,
                            tie_word_embeddings=False)).eval()
    diff, grown = _grown_logits_match(model, op)
    assert diff <= 1e-4, diff
    assert grown.config.activation_function == "relu" and not grown.config.scale_attn_weights
    assert not grown.config.tie_embeddings
    assert grown.lm_head.weight.data_ptr() != grown.transformer.wte.weight.data_ptr()


def test_growth_with_inverse_layer_idx_scaling():
    model = from_hf(hf_gpt2(seed=6, scale_attn_by_inverse_layer_idx=True)).eval()
    for op in ("width", "append_id"):  # old layers keep their index: exact
        diff, model = _grown_logits_match(model, op)
        assert diff <= 1e-4, (op, diff)
        model.eval()
    for op in ("alternate_id", "alternate_copy", "append_copy"):
        with pytest.raises(GrowthError, match="scale_attn_by_inverse_layer_idx.*append_id"):
            grow_model(model, None, op)


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("change, match", [
    (dict(activation_function="mish"), "activation_function='mish'"),
    (dict(add_cross_attention=True), "add_cross_attention"),
    (dict(n_inner=96), "n_inner=96"),
], ids=["activation", "cross_attention", "n_inner"])
def test_config_from_hf_refuses(change, match):
    with pytest.raises(HFImportError, match=match):
        config_from_hf(GPT2Config(n_embd=32, n_head=2, n_layer=1, **change))


def test_other_model_types_are_refused():
    from transformers import BertConfig, OPTConfig

    for cfg in (BertConfig(), OPTConfig()):
        with pytest.raises(HFImportError, match=f"model_type '{cfg.model_type}' is not supported"):
            config_from_hf(cfg)
    assert config_from_hf(LlamaConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                      num_hidden_layers=1)).arch == "llama"  # dispatched by model_type


def _gpt2_folder(path, vocab=50257, **options):
    hf_gpt2(seed=7, vocab=vocab, **options).save_pretrained(path)
    return path


def _edit_weights(folder, drop=None, add=None):
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(3)
    save_file(state, str(weights), metadata={"format": "pt"})


def test_folder_weights_must_match(tmp_path):
    good = _gpt2_folder(tmp_path / "good", tie_word_embeddings=False)
    assert not load_pretrained(good).config.tie_embeddings
    cases = {
        "missing_block": dict(drop="transformer.h.1.mlp.c_fc.bias"),
        "missing_head": dict(drop="lm_head.weight"),
        "extra": dict(add="transformer.h.0.extra.weight"),
    }
    for name, edit in cases.items():
        folder = _gpt2_folder(tmp_path / name, tie_word_embeddings=False)
        _edit_weights(folder, **edit)
        with pytest.raises(HFImportError) as e:
            load_pretrained(folder)
        named = edit.get("drop") or edit.get("add")
        assert named in str(e.value) and "(--random)" in str(e.value)
        assert ("missing" if "drop" in edit else "no place for") in str(e.value)


def test_llama_folder_with_a_missing_weight_is_refused(tmp_path):
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      bos_token_id=0, eos_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    assert load_pretrained(tmp_path).config.arch == "llama"
    _edit_weights(tmp_path, drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(HFImportError, match=r"missing \(transformer.h.1.mlp.up_proj.weight|model.layers.1.mlp.up_proj"):
        load_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------ CLIs
def _bert_folder(path):
    from transformers import BertConfig

    path.mkdir()
    (path / "config.json").write_text(json.dumps(dict(BertConfig(hidden_size=32, num_hidden_layers=1,
                                                                 num_attention_heads=2).to_dict(),
                                                      architectures=["BertModel"])))
    return path


def test_train_cli_refuses_with_exit_2_and_writes_nothing(tmp_path, data_cache, capsys):
    from train_utils import train

    missing = _gpt2_folder(tmp_path / "missing", tie_word_embeddings=False)
    _edit_weights(missing, drop="transformer.h.0.attn.c_attn.weight")
    cases = [
        (missing, ["transformer.h.0.attn.c_attn.weight", "missing"]),
        (_bert_folder(tmp_path / "bert"), ["model_type 'bert' is not supported"]),
        (_gpt2_folder(tmp_path / "act", activation_function="mish"), ["activation_function='mish'"]),
    ]
    for folder, fragments in cases:
        run = tmp_path / f"run-{folder.name}"
        code = train(run, data_cache, "--train_steps", "1", "--model", str(folder), "--seqlen", "24")
        err = capsys.readouterr().err
        assert code == 2, err
        assert "\nerror: " in "\n" + err and "Traceback" not in err and "newly initialized" not in err
        for f in fragments:
            assert f in err, err
        assert not run.exists()


def test_a_config_level_refusal_comes_before_data_preparation(tmp_path, capsys):
    """A folder refused by its config.json alone (another model_type, an unknown activation) costs no
    tokenization: the data cache stays untouched."""
    from train_utils import train

    cache = tmp_path / "cache"
    for folder in (_bert_folder(tmp_path / "bert"), _gpt2_folder(tmp_path / "act", activation_function="mish")):
        assert train(tmp_path / f"run-{folder.name}", str(cache), "--train_steps", "1", "--model", str(folder),
                     "--seqlen", "24") == 2
        assert "Traceback" not in capsys.readouterr().err
        assert not cache.exists() or not any(cache.iterdir())


def test_a_depth_op_that_moves_layer_scaled_attention_is_refused_before_training(tmp_path, data_cache, capsys):
    from train_utils import train

    folder = _gpt2_folder(tmp_path / "hf", scale_attn_by_inverse_layer_idx=True)
    run = tmp_path / "run"
    code = train(run, data_cache, "--train_steps", "4", "--model", str(folder), "--seqlen", "24",
                 "--grow_at", "2", "--grow_ops", "alternate_id")
    err = capsys.readouterr().err
    assert code == 2, err
    assert "scale_attn_by_inverse_layer_idx" in err and "append_id" in err and "Traceback" not in err
    assert not list(run.glob("step_*"))  # refused at start, not at update 2


def test_evaluate_and_sample_clis_refuse_with_exit_2(tmp_path, capsys):
    from staged_fast.evaluate.common import run_cli
    from staged_fast.sample import main as sample_main

    folder = _gpt2_folder(tmp_path / "hf")
    _edit_weights(folder, add="transformer.h.0.attn.q_attn.weight")
    assert run_cli(sample_main, ["--checkpoint", str(folder), "--prompt", "a", "--max_new_tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "transformer.h.0.attn.q_attn.weight" in err
    assert "could not load" not in err  # the refusal's own paragraph, not wrapped in a generic one


def test_train_from_an_imported_folder_on_a_saved_dataset(tmp_path, data_cache):
    """End to end: --model (untied, relu, layer-scaled) + --data (a save_to_disk folder); the trained
    checkpoint keeps the options and exports back to an equivalent transformers model."""
    import datasets

    from staged_fast.export import export
    from train_utils import train

    folder = _gpt2_folder(tmp_path / "hf", **OPTIONS["all"])
    texts = [f"Line {i}: the lighthouse keeper counts {i} ships." for i in range(2000)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    run = tmp_path / "run"
    assert train(run, str(tmp_path / "cache"), "--train_steps", "2", "--model", str(folder), "--seqlen", "24",
                 "--data", str(tmp_path / "saved")) == 0
    ckpt = sorted(run.glob("step_*"))[-1]
    model = load_model(ckpt)
    assert model.config.activation_function == "relu" and model.config.scale_attn_by_inverse_layer_idx
    assert not model.config.tie_embeddings
    out = export(str(ckpt), tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        assert max_diff(hf(idx).logits, model(idx)) <= TOL
