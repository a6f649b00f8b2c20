"""Export to a Hugging Face folder: logits and tokenizer round trips, grown shapes, bad input."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from staged_fast.checkpoint import load_model, save_checkpoint
from staged_fast.config import GPTConfig
from staged_fast.evaluate.common import run_cli
from staged_fast.export import export, main
from staged_fast.model import GPT
from staged_fast.tokenizer import load_tokenizer

TEXT = " = Harbor Lighthouse = \n\nIt's 21.5 metres tall — café, naïve, 1864! <|endoftext|> Done.\t  x"


def saved(tmp_path, seed=0, **shape):
    torch.manual_seed(seed)
    cfg = GPTConfig(**dict(dict(n_layer=2, n_embd=64, n_head=2, n_positions=32, dropout=0.1, attn_dropout=0.1),
                           **shape))
    model = GPT(cfg).eval()
    with torch.no_grad():  # non-zero biases and layer-norm affines, so a mix-up in any of them shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model, save_checkpoint(tmp_path / "run", step=7, model=model, config=cfg)


@pytest.mark.parametrize("shape", [{}, dict(n_layer=3, n_embd=96, n_head=3, n_positions=40)])
def test_export_round_trip(tmp_path, shape):
    """Our logits equal those of AutoModelForCausalLM loaded from the export (a grown shape too)."""
    model, ckpt = saved(tmp_path, **shape)
    out = export(str(ckpt), tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert hf.config.n_layer == model.config.n_layer and hf.config.n_embd == model.config.n_embd
    idx = torch.randint(0, 50257, (2, model.config.n_positions))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=1e-4)
    # and back: the exported folder is itself a checkpoint our tools load
    again = load_model(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(idx), model(idx), atol=1e-5, rtol=1e-5)


def test_exported_tokenizer_round_trips(tmp_path):
    _, ckpt = saved(tmp_path)
    out = export(str(ckpt), tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(out)
    ref = load_tokenizer("gpt2")
    ids = tok.encode(TEXT)
    assert ids == ref.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.eos_token_id == 50256 and tok.model_max_length == 32
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2TokenizerFast"


def test_export_bf16(tmp_path):
    model, ckpt = saved(tmp_path)
    out = export(str(ckpt), tmp_path / "hf", dtype="bf16", write_tokenizer=False)
    assert not (out / "tokenizer.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    wte = hf.transformer.wte.weight
    torch.testing.assert_close(wte, model.transformer.wte.weight.bfloat16().float())


def test_export_cli_and_bad_input(tmp_path, capsys):
    _, ckpt = saved(tmp_path)
    out = tmp_path / "hf"
    assert run_cli(main, [str(ckpt.parent), "--out", str(out)]) == 0  # a run folder: its newest checkpoint
    assert "lm_eval --model hf" in capsys.readouterr().out
    assert run_cli(main, [str(ckpt), "--out", str(out)]) == 2  # not empty
    assert "--overwrite" in capsys.readouterr().err
    assert run_cli(main, [str(ckpt), "--out", str(out), "--overwrite"]) == 0
    assert run_cli(main, [str(ckpt), "--out", str(ckpt)]) == 2  # would clobber a checkpoint
    assert run_cli(main, [str(tmp_path / "missing" / "ckpt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err  # export takes it as an argument, not a --checkpoint flag
    assert f"checkpoint {tmp_path / 'missing' / 'ckpt'}: no such folder" in err and "--checkpoint" not in err
    with pytest.raises(SystemExit) as exited:  # one says which to save, the other to save none
        main([str(ckpt), "--out", str(tmp_path / "o3"), "--no_tokenizer", "--tokenizer", "gpt2"])
    assert exited.value.code == 2 and "give one of them" in capsys.readouterr().err
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "model.pt").write_bytes(b"\0")
    assert run_cli(main, [str(unknown), "--out", str(tmp_path / "o2")]) == 2
    assert "not a staged_fast checkpoint" in capsys.readouterr().err


def test_export_rejects_a_too_small_vocab(tmp_path, capsys):
    _, ckpt = saved(tmp_path, vocab_size=1000)
    assert run_cli(main, [str(ckpt), "--out", str(tmp_path / "hf")]) == 2
    assert "vocabulary has only 1000" in capsys.readouterr().err
    assert run_cli(main, [str(ckpt), "--out", str(tmp_path / "hf2"), "--no_tokenizer"]) == 0


def test_bad_out_is_refused_before_any_work(tmp_path, capsys):
    _, ckpt = saved(tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert run_cli(main, [str(ckpt), "--out", str(a_file)]) == 2
    assert "is a file; it must be a folder" in capsys.readouterr().err
    assert run_cli(main, [str(ckpt), "--out", str(a_file / "sub")]) == 2
    assert "cannot be made" in capsys.readouterr().err
    # a run folder, even with --overwrite: its loaders would then read the export instead of the newest checkpoint
    assert run_cli(main, [str(ckpt), "--out", str(ckpt.parent), "--overwrite"]) == 2
    assert "is a training run's folder" in capsys.readouterr().err
    assert not (ckpt.parent / "config.json").exists()


def test_export_takes_the_tokenizer_the_run_trained_with(tmp_path):
    """A run trained with its own --tokenizer exports that tokenizer, and the config's special ids are its; the
    export used to write GPT-2 BPE whatever the run used."""
    folder = tmp_path / "tok"
    tok = load_tokenizer("gpt2")
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=50264)
    ckpt = save_checkpoint(tmp_path / "run", step=3, model=GPT(cfg), config=cfg,
                           trainer_state={"args": {"tokenizer": str(folder)}})
    out = export(str(ckpt.parent), tmp_path / "hf")
    exported = AutoTokenizer.from_pretrained(out)
    assert exported.encode("<|user|> hi<|assistant|>") == [50257, 23105, 50258]
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == tok.eos_token_id == 50256
    # and the export of the export keeps them: the tokenizer saved in the folder wins
    again = export(str(out), tmp_path / "hf2")
    assert AutoTokenizer.from_pretrained(again).encode("<|user|>") == [50257]
