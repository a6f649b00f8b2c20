"""WikiText perplexity and LAMBADA accuracy against independent computations, on local fixtures."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from staged_fast.checkpoint import save_checkpoint
from staged_fast.config import GPTConfig
from staged_fast.evaluate import evaluate_lambada, evaluate_wikitext, load_lambada, load_wikitext
from staged_fast.evaluate.__main__ import main
from staged_fast.evaluate.common import run_cli
from staged_fast.evaluate.lambada import split_last_word
from staged_fast.hf import to_hf
from staged_fast.model import GPT
from staged_fast.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
WIKITEXT = FIXTURES / "wikitext_tiny.raw"
LAMBADA = FIXTURES / "lambada_tiny.jsonl"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


def tiny_config(**kw):
    base = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=50257, n_positions=64, dropout=0.0, attn_dropout=0.0)
    return GPTConfig(**dict(base, **kw))


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()


@pytest.fixture(scope="module")
def random_ckpt(random_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    return save_checkpoint(path, step=3, model=random_model, config=random_model.config)


# ----------------------------------------------------------------------------------------------- wikitext

def hf_block_ppl(model, ids, context):
    """The seed's protocol with transformers: non-overlapping blocks, labels = inputs, mean token loss."""
    hf = to_hf(model).eval()
    n = len(ids) // context
    blocks = torch.tensor(ids[: n * context]).view(n, context)
    with torch.no_grad():
        loss = hf(input_ids=blocks, labels=blocks).loss  # every block scores context - 1 tokens
    return math.exp(loss.item()), n * (context - 1)


def hf_strided_ppl(model, ids, context, stride):
    """HF's perplexity guide: windows step by `stride`, each scores only the targets not scored before."""
    hf = to_hf(model).eval()
    ids = torch.tensor(ids)
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids) - context + 1, stride):
        end = begin + context
        x = ids[begin:end][None]
        labels = x.clone()
        labels[:, : -(end - prev_end)] = -100
        with torch.no_grad():
            loss = hf(input_ids=x, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        nll, count, prev_end = nll + loss.item() * n, count + n, end
    return math.exp(nll / count), count


def fixture_ids(tok):
    ids = []
    for line in WIKITEXT.read_text(encoding="utf-8").splitlines(keepends=True):
        ids += tok.encode(line if line.strip() else "")
    return ids


def test_wikitext_blocks_match_transformers(random_model, tok):
    rows, _ = load_wikitext(str(WIKITEXT))
    ids = fixture_ids(tok)
    result = evaluate_wikitext(random_model, tok, rows, context=32, batch_size=5, progress=False)
    expected, n_scored = hf_block_ppl(random_model, ids, 32)
    assert result["tokens_total"] == len(ids)
    assert result["tokens_scored"] == n_scored
    assert result["ppl"] == pytest.approx(expected, rel=1e-5)
    assert result["protocol"] == "blocks"


def test_wikitext_stride_equal_context_is_block_mode(random_model, tok):
    rows, _ = load_wikitext(str(WIKITEXT))
    blocks = evaluate_wikitext(random_model, tok, rows, context=48, progress=False)
    strided = evaluate_wikitext(random_model, tok, rows, context=48, stride=48, batch_size=3, progress=False)
    assert strided["tokens_scored"] == blocks["tokens_scored"]
    assert strided["ppl"] == pytest.approx(blocks["ppl"], rel=1e-6)


def test_wikitext_sliding_window_matches_transformers(random_model, tok):
    rows, _ = load_wikitext(str(WIKITEXT))
    result = evaluate_wikitext(random_model, tok, rows, context=40, stride=13, batch_size=4, progress=False)
    expected, n_scored = hf_strided_ppl(random_model, fixture_ids(tok), 40, 13)
    assert result["tokens_scored"] == n_scored
    assert result["ppl"] == pytest.approx(expected, rel=1e-5)
    assert result["protocol"] == "sliding_window"


def test_wikitext_bf16_close_to_fp32(random_model, tok):
    rows, _ = load_wikitext(str(WIKITEXT))
    fp32 = evaluate_wikitext(random_model, tok, rows, context=64, progress=False)
    bf16 = evaluate_wikitext(random_model, tok, rows, context=64, dtype="bf16", progress=False)
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-2)


def test_wikitext_cli_writes_json(random_ckpt, tmp_path, capsys):
    out = tmp_path / "r" / "wikitext.json"
    code = run_cli(main, ["wikitext", "--checkpoint", str(random_ckpt), "--data_file", str(WIKITEXT),
                          "--context", "32", "--no_progress", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["task"] == "wikitext" and result["context"] == 32 and result["model"]["n_layer"] == 2
    assert math.isclose(result["ppl"], math.exp(result["loss"]))
    assert "ppl" in capsys.readouterr().out


def test_wikitext_context_defaults_to_the_seqlen_the_run_trained_with(tmp_path, capsys):
    """A run trained at --seqlen 16 in a 32-position table: the default window is 16, not the table's 32, whose
    positions past 16 were never trained (the ppl measured them)."""

    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_embd=32, n_head=2, n_positions=32)
    ckpt = save_checkpoint(tmp_path / "run", step=1, model=GPT(cfg), config=cfg, trainer_state={"args": {"seqlen": 16}})
    result = main(["wikitext", "--checkpoint", str(ckpt.parent), "--data_file", str(WIKITEXT), "--no_progress"])
    assert result["context"] == 16 and "--context 16: the --seqlen the run trained with" in capsys.readouterr().err
    given = main(["wikitext", "--checkpoint", str(ckpt), "--data_file", str(WIKITEXT), "--no_progress",
                  "--context", "32"])
    assert given["context"] == 32


def test_a_bad_out_is_refused_before_the_evaluation(random_ckpt, tmp_path, capsys):
    """--out a folder used to end in a traceback after the whole evaluation had run, its result lost."""
    for out, said in ((tmp_path, "is a folder; it must name a file"), (tmp_path / "f" / "x" / "r.json", "is a file, not a folder")):
        if said == "is a file, not a folder":
            (tmp_path / "f").write_text("a file where a folder should be")
        code = run_cli(main, ["wikitext", "--checkpoint", str(random_ckpt), "--data_file", str(WIKITEXT),
                              "--context", "32", "--no_progress", "--out", str(out)])
        captured = capsys.readouterr()
        assert code == 2 and said in captured.err, captured.err
        assert "ppl" not in captured.out  # refused before it evaluated


# ----------------------------------------------------------------------------------------------- lambada

def lookup_model(table: dict[int, int], seed: int = 0) -> GPT:
    """A real GPT that is a bigram lookup table: next token = table[current], or the current one if absent.

    Embedding rows are zero-mean with norm sqrt(d), so every layer norm passes them unchanged. Attention
    and the second block are switched off (zero output projections). Block 0's MLP has one hidden unit per
    table entry a -> b: its input row detects e_a (cosine 1 versus < 0.8 for every other token, margin
    scaled by 50 so GELU is ~0 off-target) and its output column adds e_b - e_a, turning the residual into
    e_b. The tied head then scores e_b . e_v, largest for v = b by a wide margin.
    """
    cfg = tiny_config()
    model = GPT(cfg).eval()
    d, s, thresh = cfg.n_embd, 50.0, 0.8
    assert len(table) <= 4 * d
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(cfg.vocab_size, d, generator=g, dtype=torch.float64)
    emb -= emb.mean(dim=1, keepdim=True)
    emb *= math.sqrt(d) / emb.norm(dim=1, keepdim=True)
    for a in table:  # the detectors fire for exactly one token
        cos = (emb @ emb[a]) / d
        cos[a] = -1
        assert cos.max() < thresh - 0.1
    fc_w = torch.zeros(4 * d, d, dtype=torch.float64)
    fc_b = torch.zeros(4 * d, dtype=torch.float64)
    proj_w = torch.zeros(d, 4 * d, dtype=torch.float64)
    on = torch.nn.functional.gelu(torch.tensor(s * (1 - thresh), dtype=torch.float64), approximate="tanh")
    for j, (a, b) in enumerate(table.items()):
        fc_w[j] = s * emb[a] / d
        fc_b[j] = -s * thresh
        proj_w[:, j] = (emb[b] - emb[a]) / on
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.wte.weight.copy_(emb)
        for ln in [model.transformer.ln_f] + [m for blk in model.transformer.h for m in (blk.ln_1, blk.ln_2)]:
            ln.weight.fill_(1.0)
        mlp = model.transformer.h[0].mlp
        mlp.c_fc.weight.copy_(fc_w)
        mlp.c_fc.bias.copy_(fc_b)
        mlp.c_proj.weight.copy_(proj_w)
    return model


def lambada_table(tok, texts):
    """The bigram table that continues every fixture context with its last word, token by token."""
    table = {}
    for text in texts:
        context, target = split_last_word(text)
        chain = tok.encode(context)[-1:] + tok.encode(target)
        for a, b in zip(chain, chain[1:]):
            assert table.setdefault(a, b) == b, "fixture contexts must not ask one token for two continuations"
    return table


def test_split_last_word():
    assert split_last_word("  he spread his map \n") == ("he spread his", " map")
    assert split_last_word('He said "stop."\tThen he  left.') == ('He said "stop."\tThen he', " left.")
    with pytest.raises(ValueError, match="fewer than two words"):
        split_last_word("  lonely ")


def test_lookup_model_predicts_its_table(tok):
    table = {262: 3797, 3797: 3797}
    model = lookup_model(table)
    with torch.no_grad():
        pred = model(torch.tensor([[262, 3797, 995]])).argmax(-1)
    assert pred.tolist() == [[3797, 3797, 995]]


def test_lambada_known_answers_are_all_right(tok, tmp_path):
    texts, _ = load_lambada(str(LAMBADA))
    model = lookup_model(lambada_table(tok, texts))
    result = evaluate_lambada(model, tok, texts, batch_size=2, progress=False)
    assert result["examples"] == 5
    assert result["multi_token_targets"] == 2  # " sunflowers" and " Bartholomew" are 3 tokens each
    assert result["accuracy"] == result["acc_whole_word"] == result["acc_last_token"] == 1.0
    assert result["ppl"] == pytest.approx(1.0, abs=1e-3)
    # the same through a saved checkpoint and the CLI
    ckpt = save_checkpoint(tmp_path, step=1, model=model, config=model.config)
    out = tmp_path / "lambada.json"
    assert run_cli(main, ["lambada", "--checkpoint", str(ckpt), "--data_file", str(LAMBADA), "--no_progress",
                          "--out", str(out)]) == 0
    assert json.loads(out.read_text())["accuracy"] == 1.0


def test_lambada_multi_token_words_are_scored_whole(tok):
    texts, _ = load_lambada(str(LAMBADA))
    table = lambada_table(tok, texts)
    context, target = split_last_word(texts[1])  # "... tall yellow" -> " sunflowers" = [" sun", "fl", "owers"]
    sun, fl, owers = tok.encode(target)
    del table[tok.encode(context)[-1]]  # the first token is now wrong, the later ones still right
    model = lookup_model(table)
    result = evaluate_lambada(model, tok, texts, progress=False)
    assert result["acc_whole_word"] == pytest.approx(4 / 5)
    assert result["acc_last_token"] == 1.0
    assert evaluate_lambada(model, tok, texts, last_token_only=True, progress=False)["accuracy"] == 1.0
    # and a wrong middle token: first and last right, the word still counts as wrong
    table = lambada_table(tok, texts)
    table[sun] = owers
    table[owers] = owers
    del table[fl]
    model = lookup_model(table)
    result = evaluate_lambada(model, tok, texts, progress=False)
    assert result["acc_whole_word"] == pytest.approx(4 / 5)


def test_lambada_ppl_matches_transformers(random_model, tok):
    texts, _ = load_lambada(str(LAMBADA))
    result = evaluate_lambada(random_model, tok, texts, batch_size=3, progress=False)
    hf = to_hf(random_model).eval()
    nll, n_tokens, last_hits = [], 0, 0
    for text in texts:  # the seed's way: tokenize the whole stripped passage
        ids = tok.encode(text.strip())
        n_tgt = len(tok.encode(split_last_word(text)[1]))
        with torch.no_grad():
            logp = hf(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        nll.append(-sum(logp[i - 1, ids[i]].item() for i in range(len(ids) - n_tgt, len(ids))))
        n_tokens += n_tgt
        last_hits += int(logp[-2].argmax()) == ids[-1]
    assert result["ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert result["token_ppl"] == pytest.approx(math.exp(sum(nll) / n_tokens), rel=1e-5)
    assert result["acc_last_token"] == last_hits / len(texts)


def test_lambada_long_context_is_truncated_from_the_left(random_model, tok):
    long_text = "word " * 200 + "the end"
    result = evaluate_lambada(random_model, tok, [long_text], progress=False)
    assert result["truncated_contexts"] == 1 and result["examples"] == 1


# ----------------------------------------------------------------------------------------------- bad input

def run_main(argv, capsys):
    code = run_cli(main, argv)
    return code, capsys.readouterr().err


def test_missing_data_file(random_ckpt, tmp_path, capsys):
    code, err = run_main(["wikitext", "--checkpoint", str(random_ckpt), "--data_file", str(tmp_path / "no.raw")],
                         capsys)
    assert code == 2 and "no such file" in err and "Fix" in err


def test_jsonl_without_text_field(random_ckpt, capsys):
    code, err = run_main(["lambada", "--checkpoint", str(random_ckpt),
                          "--data_file", str(FIXTURES / "lambada_no_text.jsonl")], capsys)
    assert code == 2 and "no string field 'text'" in err and "'passage'" in err


def test_jsonl_not_json(random_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\n")
    code, err = run_main(["lambada", "--checkpoint", str(random_ckpt), "--data_file", str(bad)], capsys)
    assert code == 2 and "line 1 is not valid JSON" in err


def test_checkpoint_of_unknown_format(tmp_path, capsys):
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 16)
    code, err = run_main(["lambada", "--checkpoint", str(folder), "--data_file", str(LAMBADA)], capsys)
    assert code == 2 and "not a staged_fast checkpoint" in err and "Hugging Face" in err
    code, err = run_main(["lambada", "--checkpoint", str(folder / "weights.bin"), "--data_file", str(LAMBADA)],
                         capsys)
    assert code == 2 and "is a file" in err


@pytest.mark.parametrize("task, name", [("wikitext", "wiki.raw"), ("lambada", "lambada.jsonl")])
def test_data_file_not_utf8(random_ckpt, tmp_path, capsys, task, name):
    bad = tmp_path / name
    bad.write_bytes('{"text": "caf\xe9 au lait"}\n'.encode("latin-1"))
    code, err = run_main([task, "--checkpoint", str(random_ckpt), "--data_file", str(bad)], capsys)
    assert code == 2 and "not UTF-8" in err and "Fix" in err, err


def test_missing_checkpoint(tmp_path, capsys):
    code, err = run_main(["wikitext", "--checkpoint", str(tmp_path / "a" / "b"), "--data_file", str(WIKITEXT)],
                         capsys)
    assert code == 2 and "no such folder" in err


def test_context_longer_than_model(random_ckpt, capsys):
    code, err = run_main(["wikitext", "--checkpoint", str(random_ckpt), "--data_file", str(WIKITEXT),
                          "--context", "1024"], capsys)
    assert code == 2 and "n_positions (64)" in err


def test_cli_exit_code_in_a_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "staged_fast.evaluate", "lambada", "--checkpoint",
                           str(tmp_path / "nowhere" / "x"), "--data_file", str(LAMBADA)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_wikitext_data_file_formats_agree(tmp_path):
    rows, _ = load_wikitext(str(WIKITEXT))
    assert rows[0] == "" and rows[1].endswith(" \n")  # blank lines empty, newlines kept, as the HF dataset
    jsonl = tmp_path / "w.jsonl"
    jsonl.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    assert load_wikitext(str(jsonl))[0] == rows
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.table({"text": rows}), parquet)
    assert load_wikitext(str(parquet))[0] == rows


def test_stride_larger_than_context(random_ckpt, capsys):
    code, err = run_main(["wikitext", "--checkpoint", str(random_ckpt), "--data_file", str(WIKITEXT),
                          "--context", "32", "--stride", "33"], capsys)
    assert code == 2 and "--stride 33" in err


@pytest.fixture(scope="module")
def head_dim_80_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=1, n_embd=80, n_head=1)).eval()
    return save_checkpoint(tmp_path_factory.mktemp("hd80"), step=1, model=model, config=model.config)


def test_kernels_triton_on_a_head_dim_the_flash_kernel_lacks_is_refused(head_dim_80_ckpt, capsys):
    code, err = run_main(["wikitext", "--checkpoint", str(head_dim_80_ckpt), "--data_file", str(WIKITEXT),
                          "--kernels", "triton"], capsys)
    assert code == 2 and "is 80" in err and "--kernels torch" in err, err


def test_kernels_auto_evaluates_a_head_dim_the_flash_kernel_lacks_with_torch(head_dim_80_ckpt, monkeypatch, capsys):
    """auto picks Triton on CUDA: a head_dim the flash kernel lacks used to crash at the first forward."""
    import staged_fast.kernels as kernels

    monkeypatch.setattr(kernels, "resolve_backend", lambda name, device: "triton")  # auto, as on CUDA
    code, err = run_main(["wikitext", "--checkpoint", str(head_dim_80_ckpt), "--data_file", str(WIKITEXT),
                          "--kernels", "auto"], capsys)
    assert code == 0, err
    assert "--kernels auto: head_dim 80 is not one the flash attention kernel is built for" in err
    assert "attention runs PyTorch's SDPA" in err


def test_a_cuda_device_chosen_by_number_becomes_the_current_device(monkeypatch):
    """Triton launches a kernel on the current CUDA device, not on its tensors' device: `--device cuda:1`
    with device 0 current ran the kernels on device 0 with pointers into device 1. (CUDA is stood in.)"""
    from staged_fast.evaluate.common import InputError, pick_device

    from torch.cuda._utils import _get_device_index

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    # what torch.cuda.set_device does first (it refuses a device without an index), then the switch
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(_get_device_index(d)))
    assert pick_device("cuda:1") == torch.device("cuda:1") and current == [1]
    assert pick_device("cuda") == torch.device("cuda:0") and current == [1, 0]  # raised ValueError
    with pytest.raises(InputError, match="sees 2 CUDA device"):
        pick_device("cuda:2")
