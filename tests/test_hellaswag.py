"""HellaSwag: acc and acc_norm against a plain per-ending computation; the CLI; bad input."""
import json
from pathlib import Path

import pytest
import torch

from staged_fast.checkpoint import save_checkpoint
from staged_fast.config import GPTConfig
from staged_fast.evaluate import evaluate_hellaswag, load_hellaswag
from staged_fast.evaluate.__main__ import main
from staged_fast.evaluate.common import run_cli
from staged_fast.evaluate.hellaswag import RAW_URL
from staged_fast.model import GPT
from staged_fast.tokenizer import load_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "hellaswag_tiny.jsonl"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_embd=64, n_head=2, vocab_size=50257, n_positions=64, dropout=0.0,
                         attn_dropout=0.0)).eval()


def reference_choices(model, tok, examples):
    """Per example: (argmin total NLL, argmin mean NLL) of its endings, each scored alone in float64."""
    picks = []
    for ctx, endings, _ in examples:
        context = tok.encode(ctx)
        total, mean = [], []
        for ending in endings:
            target = tok.encode(" " + ending)
            ids = torch.tensor([context + target])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids[:, :-1]).double(), dim=-1)[0]
            nll = -sum(logp[len(context) - 1 + k, t].item() for k, t in enumerate(target))
            total.append(nll)
            mean.append(nll / len(target))
        picks.append((total.index(min(total)), mean.index(min(mean))))
    return picks


def test_labels_as_strings_or_ints_load(tok):
    examples, source = load_hellaswag(str(FIXTURE))
    assert source == str(FIXTURE) and len(examples) == 5
    assert [label for _, _, label in examples] == [0, 1, 2, 3, 0]
    assert all(len(endings) == 4 for _, endings, _ in examples)


@pytest.mark.parametrize("batch_size", [1, 3, 16])  # 3: one example's four rows split across batches
def test_choices_match_a_plain_computation(model, tok, batch_size):
    examples, _ = load_hellaswag(str(FIXTURE))
    picks = reference_choices(model, tok, examples)
    for i, (ctx, endings, _) in enumerate(examples):  # each example alone: its own pick is the right one
        by_total = evaluate_hellaswag(model, tok, [(ctx, endings, picks[i][0])], batch_size=batch_size, progress=False)
        by_mean = evaluate_hellaswag(model, tok, [(ctx, endings, picks[i][1])], batch_size=batch_size, progress=False)
        assert by_total["acc"] == 1.0 and by_mean["acc_norm"] == 1.0, i
    all_right = [(ctx, endings, picks[i][0]) for i, (ctx, endings, _) in enumerate(examples)]
    result = evaluate_hellaswag(model, tok, all_right, batch_size=batch_size, progress=False)
    assert result["acc"] == 1.0 and result["examples"] == 5
    want = sum(p[1] == label for p, (_, _, label) in zip(picks, examples)) / 5
    assert evaluate_hellaswag(model, tok, examples, batch_size=batch_size, progress=False)["acc_norm"] == want


def test_a_context_longer_than_the_window_keeps_its_end(model, tok):
    examples = [("word " * 200 + "and then he", ["sat down.", "stood up.", "left the room.", "laughed."], 0)]
    result = evaluate_hellaswag(model, tok, examples, progress=False)
    assert result["truncated_rows"] == 4 and result["examples"] == 1


def test_the_cli_scores_a_checkpoint_and_writes_json(model, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "run", step=1, model=model, config=model.config)
    out = tmp_path / "hs.json"
    assert run_cli(main, ["hellaswag", "--checkpoint", str(ckpt), "--data_file", str(FIXTURE), "--limit", "2",
                          "--no_progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["examples"] == 2 and 0 <= result["acc_norm"] <= 1 and result["task"] == "hellaswag"
    assert "acc_norm" in capsys.readouterr().out


@pytest.mark.parametrize("line, message", [
    ('{"ctx": "x", "endings": ["a", "b", "c"], "label": 0}', "needs 4 non-empty strings under 'endings'"),
    ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": ""}', "HellaSwag's test split has no labels"),
    ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 4}', "must be the right ending's index, 0 to 3"),
    ('{"endings": ["a", "b", "c", "d"], "label": 1}', "has no text under 'ctx'"),
    ('["x"]', "is a list, not an object"),
    ('{"ctx": "x",', "is not valid JSON"),
    ('', "holds no examples"),
])
def test_bad_rows_are_refused_with_the_form(model, tmp_path, capsys, line, message):
    ckpt = save_checkpoint(tmp_path / "run", step=1, model=model, config=model.config)
    data = tmp_path / "bad.jsonl"
    data.write_text(line + "\n")
    assert run_cli(main, ["hellaswag", "--checkpoint", str(ckpt), "--data_file", str(data), "--no_progress"]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_file_and_a_bad_limit_are_refused(tmp_path, capsys):
    assert run_cli(main, ["hellaswag", "--checkpoint", "x", "--data_file", str(tmp_path / "no.jsonl")]) == 2
    assert RAW_URL in capsys.readouterr().err
    assert run_cli(main, ["hellaswag", "--checkpoint", "x", "--data_file", str(FIXTURE), "--limit", "0"]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err


def test_offline_without_a_cached_copy_says_how_to_work_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    import datasets.config  # read at import: set its flags too, so that no download is tried

    for flag in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setattr(datasets.config, flag, True, raising=False)
    with pytest.raises(ValueError, match="could not load HellaSwag from the Hugging Face hub") as info:
        load_hellaswag(None)
    assert RAW_URL in str(info.value) and "--data_file" in str(info.value)
