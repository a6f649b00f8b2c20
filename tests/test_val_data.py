"""--val_data: a separate validation set; --data is then all train."""
import json

import numpy as np
import pytest

from staged_fast.data import DataError, prepare_data
from test_data import split_at_eos
from train_utils import train

TRAIN = [f"Training document {i}: a heron waits by the reeds {'and waits ' * (i % 3 + 1)}for a fish." for i in range(9)]
VAL = [f"Held-out document {i}: the ferry leaves at {i + 6} o'clock {'sharp ' * (i % 2 + 1)}today." for i in range(4)]



def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_every_document_lands_on_its_own_side_in_order(tmp_path, tok):
    train_file, val_file = _jsonl(tmp_path / "train.jsonl", TRAIN), _jsonl(tmp_path / "val.jsonl", VAL)
    p = prepare_data([train_file], tok, tokenizer_name="gpt2", cache_dir=tmp_path / "cache", val_data=[val_file])
    assert split_at_eos(p.train, p.eos_id) == [tuple(tok.encode(t)) for t in TRAIN]
    assert split_at_eos(p.val, p.eos_id) == [tuple(tok.encode(t)) for t in VAL]
    assert "(train)" in p.source and "(val)" in p.source
    again = prepare_data([train_file], tok, tokenizer_name="gpt2", cache_dir=tmp_path / "cache", val_data=[val_file])
    assert again.fingerprint == p.fingerprint and np.array_equal(again.val, p.val)  # a cache hit
    split = prepare_data([train_file], tok, tokenizer_name="gpt2", cache_dir=tmp_path / "cache", val_fraction=0.2)
    assert split.fingerprint != p.fingerprint and len(split.train) < len(p.train)  # the split is its own entry


def test_the_same_input_for_both_is_refused(tmp_path, tok):
    train_file = _jsonl(tmp_path / "train.jsonl", TRAIN)
    with pytest.raises(DataError, match="--val_data names the same input as --data"):
        prepare_data([train_file], tok, tokenizer_name="gpt2", cache_dir=tmp_path / "cache", val_data=[train_file])


def test_a_validation_file_inside_the_training_folder_is_refused(tmp_path, tok):
    """Only the same input was refused: a --val_data file inside the --data folder trained on the validation text."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    _jsonl(folder / "a.jsonl", TRAIN)
    inside = _jsonl(folder / "b.jsonl", VAL)
    with pytest.raises(DataError, match=r"--val_data names files of --data \(.*b\.jsonl\)"):
        prepare_data([str(folder)], tok, tokenizer_name="gpt2", cache_dir=tmp_path / "cache", val_data=[inside])


def test_the_trainer_validates_on_it(tmp_path, data_cache):
    val_file = _jsonl(tmp_path / "val.jsonl", VAL * 20)
    assert train(tmp_path / "run", data_cache, "--train_steps", "2", "--val_every", "1", "--seqlen", "32",
                 "--val_data", val_file) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_loss"] is not None for r in records if "loss" in r)


@pytest.mark.parametrize("texts, message", [(VAL[:1], "fewer than one sample of seqlen + 1"),
                                             (VAL * 3, "give --val_data more text")])
def test_a_validation_set_too_small_is_refused_before_training(tmp_path, data_cache, capsys, texts, message):
    val_file = _jsonl(tmp_path / "val.jsonl", texts)
    assert train(tmp_path / "run", data_cache, "--train_steps", "2", "--val_data", val_file) == 2
    err = capsys.readouterr().err
    assert "The validation data holds" in err and message in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
