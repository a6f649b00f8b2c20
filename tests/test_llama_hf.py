"""Llama interop: export to a LlamaForCausalLM folder and import from one (logits parity <= 1e-5 fp32),
pipeline("text-generation") on the export, refusal (exit 2) of configs we cannot honour, KV-cached
sampling, evaluate/sample/export on llama checkpoints."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from staged_fast.checkpoint import load_model, save_checkpoint
from staged_fast.config import GPTConfig
from staged_fast.evaluate.common import run_cli
from staged_fast.export import export, main as export_main
from staged_fast.hf import from_hf, to_hf
from staged_fast.model import GPT
from staged_fast.sample import CachedDecoder, main as sample_main


def llama(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(arch="llama", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=192, n_positions=32,
                dropout=0.1, attn_dropout=0.1, rope_theta=500.0)
    cfg = GPTConfig(**dict(base, **kw))
    model = GPT(cfg).eval()
    with torch.no_grad():  # non-trivial RMSNorm weights, so a mix-up shows
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("kw", [dict(vocab_size=101), dict(vocab_size=101, tie_embeddings=False, n_embd=192,
                                                               n_head=2, n_kv_head=1, intermediate_size=320)],
                         ids=["tied_gqa", "untied_hd96"])
def test_export_and_import_logits_parity(kw):
    model = llama(**kw)
    idx = torch.randint(0, 101, (2, 32))
    hf = to_hf(model).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.num_key_value_heads == model.config.n_kv_head
    with torch.no_grad():
        ours = model(idx)
        assert (hf(idx).logits - ours).abs().max().item() <= 1e-5
        back = from_hf(hf).eval()
        assert back.config.same_shape(model.config) and back.config.tie_embeddings == model.config.tie_embeddings
        assert (back(idx) - ours).abs().max().item() <= 1e-5


def test_import_of_a_transformers_built_llama():
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=80, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, max_position_embeddings=48, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      rope_theta=10000.0)
    hf = LlamaForCausalLM(cfg).eval()
    ours = from_hf(hf).eval()
    assert ours.config.n_kv_head == 1 and ours.config.layer_norm_eps == 1e-6 and not ours.config.tie_embeddings
    idx = torch.randint(0, 80, (2, 48))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max().item() <= 1e-5


def test_export_folder_pipeline_and_our_tools(tmp_path):
    model = llama(vocab_size=50257)
    ckpt = save_checkpoint(tmp_path / "run", step=3, model=model, config=model.config)
    out = export(str(ckpt), tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max().item() <= 1e-5
        assert (load_model(out)(idx) - model(idx)).abs().max().item() <= 1e-5  # the folder loads back
        assert (load_model(ckpt)(idx) - model(idx)).abs().max().item() == 0
    from transformers import pipeline

    gen = pipeline("text-generation", model=str(out), tokenizer=str(out))
    text = gen("The lighthouse", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("The lighthouse")
    # sample CLI on the llama checkpoint (KV-cached decoding with RoPE and GQA)
    texts = sample_main(["--checkpoint", str(ckpt), "--prompt", "The lighthouse", "--max_new_tokens", "6",
                         "--seed", "1"])
    assert texts[0].startswith("The lighthouse")


def test_untied_checkpoint_round_trip(tmp_path):
    model = llama(vocab_size=90, tie_embeddings=False)
    ckpt = save_checkpoint(tmp_path / "run", step=1, model=model, config=model.config)
    again = load_model(ckpt)
    assert not again.config.tie_embeddings
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(again.lm_head.weight, again.transformer.wte.weight)


def test_cached_decoding_equals_full_forward():
    model = llama(vocab_size=97, n_positions=12)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, 97, (2, 3), generator=g)
    dec = CachedDecoder(model)
    with torch.no_grad():
        logits = dec.prefill(seq)
        for _ in range(14):  # past n_positions: the window is re-run
            full = model(seq[:, -12:])[:, -1]
            torch.testing.assert_close(logits, full, atol=2e-5, rtol=1e-5)
            nxt = torch.randint(0, 97, (2,), generator=g)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            logits = dec.step(nxt)


def test_cached_multi_token_chunk_after_cache():
    """The masked path of llama's cached forward (several tokens after cached ones), with GQA read from the
    cache directly (SDPA's enable_gqa; it repeated the whole cache per step before)."""
    model = llama(vocab_size=97, n_positions=16)
    seq = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(2))
    dec = CachedDecoder(model)
    with torch.no_grad():
        dec.prefill(seq[:, :6])
        chunk = dec._forward(seq[:, 6:])
        torch.testing.assert_close(chunk, model(seq)[:, 6:], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("change", [dict(hidden_act="gelu"), dict(attention_bias=True), dict(head_dim=32),
                                    dict(rope_scaling={"rope_type": "linear", "factor": 2.0})],
                         ids=["gelu", "bias", "head_dim", "rope_scaling"])
def test_import_refuses_what_it_cannot_honour_with_exit_2(tmp_path, capsys, change):
    cfg = LlamaConfig(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16, **change)
    if "rope_scaling" in change and isinstance(getattr(cfg, "rope_parameters", None), dict):
        cfg.rope_parameters = dict(cfg.rope_parameters, rope_type="linear", factor=2.0)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(cfg.to_dict(), architectures=["LlamaForCausalLM"])))
    assert run_cli(export_main, [str(folder), "--out", str(tmp_path / "out"), "--no_tokenizer"]) == 2
    err = capsys.readouterr().err
    assert "staged_fast's llama" in err or "not supported" in err
