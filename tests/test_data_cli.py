"""`python -m staged_fast.data`: the cache prepared ahead is the one a training run with the same flags reads."""
import json
import os
import subprocess
import sys
from pathlib import Path

import staged_fast.data.prepare as prepare_mod
from train_utils import train

ROOT = Path(__file__).resolve().parents[1]
DOCS = [f"Entry {i}: the orchard keeper counts {'pears and ' * (i % 3 + 1)}apples at dusk." for i in range(60)]


def _prepare_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "staged_fast.data", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_training_run_reads_the_cache_prepared_ahead(tmp_path, monkeypatch):
    """Prepared from one directory with relative paths; trained from another with absolute ones: one key."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    proc = _prepare_cli("--data", "corpus.jsonl", "--cache_dir", "cache", "--val_fraction", "0.1", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = [p for p in (work / "cache").iterdir() if (p / "meta.json").exists()]
    assert len(entries) == 1 and f"cached at {entries[0]}" in proc.stdout
    assert "--seed 1234" in proc.stdout and "validation tokens" in proc.stdout

    def no_build(*a, **k):
        raise AssertionError("the training run tokenized again")
    monkeypatch.setattr(prepare_mod, "_build", no_build)
    assert train(tmp_path / "run", str(work / "cache"), "--data", str(work / "corpus.jsonl"), "--val_fraction", "0.1",
                 "--seqlen", "16", "--batch_size", "2", "--train_steps", "2") == 0
    assert [p for p in (work / "cache").iterdir() if (p / "meta.json").exists()] == entries


def test_a_separate_validation_set_names_both_entries(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:40]))
    (tmp_path / "val.txt").write_text(" ".join(DOCS[40:]))
    proc = _prepare_cli("--data", "train.jsonl", "--val_data", "val.txt", "--cache_dir", "c", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("cached at") == 2 and "(train) +" in proc.stdout and "1 document)" in proc.stdout


def test_bad_input_exits_2_naming_it(tmp_path, monkeypatch, capsys):
    from staged_fast.data.__main__ import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a folder")
    for args, named in ((["--data", "missing_dir/x.jsonl"], "missing_dir/x.jsonl"),
                        (["--tokenizer", "./no_tokenizer_here"], "--tokenizer ./no_tokenizer_here: no such folder"),
                        (["--val_fraction", "1.5"], "--val_fraction"),
                        (["--cache_dir", "a_file"], "a_file is a file; the tokenized data is cached in a folder")):
        try:
            code = main(["--cache_dir", "c", *args])
        except SystemExit as e:  # argparse's own refusals
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and named in err, err[-2000:]
