"""KV-cached decoding equals the full forward; temperature / top-k / top-p filtering; the sample CLI."""

import pytest
import torch

from staged_fast.checkpoint import save_checkpoint
from staged_fast.config import GPTConfig
from staged_fast.evaluate.common import run_cli
from staged_fast.model import GPT
from staged_fast.sample import CachedDecoder, filter_logits, generate, main, sample_next


def small_model(vocab=97, n_positions=24, n_layer=2, n_embd=48, n_head=3, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=n_positions,
                    dropout=0.1, attn_dropout=0.1)  # dropout on in the config: eval() must switch it off
    return GPT(cfg).eval()


# ------------------------------------------------------------------------------------------ cached decode

@pytest.mark.parametrize("prompt_len", [1, 5])
def test_cached_logits_equal_full_forward_every_step(prompt_len):
    model = small_model()
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, 97, (3, prompt_len), generator=g)
    dec = CachedDecoder(model)
    with torch.no_grad():
        logits = dec.prefill(seq)
        # runs past n_positions=24, where the decoder re-runs the cropped window
        for _ in range(30):
            full = model(seq[:, -model.config.n_positions :])[:, -1]
            torch.testing.assert_close(logits, full, atol=2e-5, rtol=1e-5)
            nxt = torch.randint(0, 97, (3,), generator=g)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            logits = dec.step(nxt)


def test_cached_multi_token_chunk_after_cache():
    """A chunk of several tokens after cached ones (the masked path) gives the full forward's logits."""
    model = small_model()
    seq = torch.randint(0, 97, (2, 15))
    dec = CachedDecoder(model)
    with torch.no_grad():
        dec.prefill(seq[:, :6])
        chunk = dec._forward(seq[:, 6:])
        torch.testing.assert_close(chunk, model(seq)[:, 6:], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cache_sized_to_prompt_plus_new_tokens(monkeypatch, arch):
    """generate's caches hold prompt + new tokens, not the whole window; a decoder given too little says so."""
    if arch == "llama":
        torch.manual_seed(0)
        model = GPT(GPTConfig(arch="llama", n_layer=2, n_embd=48, n_head=4, n_kv_head=2, intermediate_size=96,
                              vocab_size=97, n_positions=24)).eval()
    else:
        model = small_model(n_positions=24)
    prompt = torch.randint(0, 97, (2, 4))
    cache_lengths = []
    real_prefill = CachedDecoder.prefill

    def prefill_and_record(self, idx):
        logits = real_prefill(self, idx)
        cache_lengths.append(self.cache[0][0].shape[2])
        return logits

    monkeypatch.setattr(CachedDecoder, "prefill", prefill_and_record)
    out = generate(model, prompt, 5, temperature=0)
    assert cache_lengths == [4 + 5]  # not n_positions=24
    with torch.no_grad():
        seq = prompt
        for _ in range(5):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1)[:, None]], dim=1)
    assert torch.equal(out, seq)
    dec = CachedDecoder(model, max_length=5)
    with torch.no_grad():
        dec.prefill(prompt)
        dec.step(prompt[:, 0])
        with pytest.raises(ValueError, match="max_length=5"):
            dec.step(prompt[:, 0])
        with pytest.raises(ValueError, match="does not fit"):
            CachedDecoder(model, max_length=3).prefill(prompt)


def test_greedy_generate_equals_uncached_greedy():
    model = small_model()
    prompt = torch.randint(0, 97, (2, 4))
    out = generate(model, prompt, 30, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(30):
            nxt = model(seq[:, -24:])[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(out, seq)


def test_generate_seeded_and_eos_padding():
    model = small_model()
    prompt = torch.zeros(4, 2, dtype=torch.long)
    a = generate(model, prompt, 12, top_k=10, generator=torch.Generator().manual_seed(5))
    b = generate(model, prompt, 12, top_k=10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (4, 14)
    out = generate(model, prompt, 12, temperature=2.0, generator=torch.Generator().manual_seed(0), eos_token_id=3)
    for row in out[:, 2:].tolist():
        if 3 in row:
            assert all(t == 3 for t in row[row.index(3):])


# ------------------------------------------------------------------------------------------ filtering

def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, -2.0, 0.5]])
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2)
    with pytest.raises(ValueError):
        filter_logits(logits, temperature=0.0)


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    torch.testing.assert_close(out[torch.isfinite(out)], torch.tensor([3.0, 2.0, 5.0, 4.0]))
    assert torch.isfinite(filter_logits(logits, top_k=0)).all()  # 0 = off
    assert torch.isfinite(filter_logits(logits, top_k=99)).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.7) == [False, True, False, True]  # 0.5 + 0.3 >= 0.7
    assert kept(0.75) == [False, True, False, True]
    assert kept(0.85) == [True, True, False, True]
    assert kept(0.01) == [False, True, False, False]  # the top token always stays
    assert kept(1.0) == [True, True, True, True]
    # the kept tokens' renormalized probabilities are proportional to the originals
    p = filter_logits(logits, top_p=0.7).softmax(-1)[0]
    torch.testing.assert_close(p, torch.tensor([0.0, 0.625, 0.0, 0.375]))


def test_filters_compose_in_order():
    # temperature first (changes the probabilities top-p sees), then top-k, then top-p
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    hot = filter_logits(logits, temperature=100.0, top_k=3, top_p=0.5)
    assert torch.isfinite(hot)[0].tolist() == [True, True, False, False]  # near-uniform over 3 -> needs 2
    cold = filter_logits(logits, temperature=0.1, top_k=3, top_p=0.5)
    assert torch.isfinite(cold)[0].tolist() == [True, False, False, False]


def test_sample_next_respects_the_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {2, 3}
    assert set(sample_next(logits, temperature=0).tolist()) == {3}
    draws = sample_next(logits, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.04, rtol=0)


# ------------------------------------------------------------------------------------------ CLI

def test_sample_cli(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_embd=32, n_head=2, n_positions=32, dropout=0.0, attn_dropout=0.0)
    model = GPT(cfg)
    ckpt = save_checkpoint(tmp_path, step=1, model=model, config=cfg)
    argv = ["--checkpoint", str(ckpt), "--prompt", "The lighthouse", "--max_new_tokens", "12",
            "--num_samples", "2", "--seed", "3", "--top_p", "0.9"]
    texts = main(argv)
    assert len(texts) == 2 and all(t.startswith("The lighthouse") for t in texts)
    assert main(argv) == texts  # same seed, same samples
    assert "sample 2/2" in capsys.readouterr().out
    assert run_cli(main, ["--checkpoint", str(tmp_path / "x" / "y"), "--prompt", "a"]) == 2
    assert run_cli(main, ["--checkpoint", str(ckpt), "--top_p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err
    # a prompt kept in a file (its editor's final newline is not part of it)
    (tmp_path / "prompt.txt").write_text("The lighthouse\n")
    assert main([*argv[:2], "--prompt_file", str(tmp_path / "prompt.txt"), *argv[4:]]) == texts
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert run_cli(main, ["--checkpoint", str(ckpt), "--prompt_file", str(tmp_path / "latin1.txt")]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err
    assert run_cli(main, ["--checkpoint", str(ckpt), "--prompt_file", str(tmp_path / "missing.txt")]) == 2
    assert "--prompt_file" in capsys.readouterr().err
    assert run_cli(main, ["--checkpoint", "latest"]) == 2  # train's word: said at once, not a hub lookup
    assert "'latest' is train's --resume word" in capsys.readouterr().err


@pytest.mark.parametrize("temperature", [0.8, 0.0])
def test_non_finite_logits_stop_generation_with_a_clear_error(temperature):
    """fp16 logits that overflow: multinomial on the NaN probabilities is a device-side assert on CUDA (the
    process's CUDA context is lost), and greedy argmax picks garbage; generation stops with the fix instead."""
    from staged_fast.evaluate.common import InputError

    model = small_model()
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("inf")  # the tied embedding: every logit of token 5 overflows
    with pytest.raises(InputError, match="not finite at new token 1.*--dtype bf16 or fp32"):
        generate(model, torch.randint(0, 97, (2, 4)), 3, temperature=temperature)
