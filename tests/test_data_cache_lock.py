"""The data cache under a cluster's habits: two jobs preparing the same data at once, and builds killed midway."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import staged_fast.data.prepare as prepare_mod
from staged_fast.data import prepare_data

ROOT = Path(__file__).resolve().parents[1]
DOCS = [f"Record {i}: a slow barge carries {'coal and ' * (i % 4 + 1)}salt down the river." for i in range(40)]

# A build that stops inside the tokenization (its scratch folder made) until the file `release` appears; argv:
# data file, cache folder, marker folder.
SLOW_BUILD = r"""
import sys, time
from pathlib import Path
import staged_fast.data.prepare as P
from staged_fast.tokenizer import load_tokenizer

data, cache, marks = sys.argv[1:4]
real = P._tokenize
def held(*a, **k):
    (Path(marks) / "building").touch()
    while not (Path(marks) / "release").exists():
        time.sleep(0.05)
    return real(*a, **k)
P._tokenize = held
P.prepare_data([data], load_tokenizer("gpt2"), tokenizer_name="gpt2", cache_dir=cache, val_fraction=0.1)
print("built", flush=True)
"""


def _jsonl(path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


def _start_slow_build(data: Path, cache: Path, marks: Path) -> subprocess.Popen:
    marks.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, str(data), str(cache), str(marks)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (marks / "building").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    return proc


def test_a_second_job_on_the_same_data_waits_for_the_first_and_does_not_build(tok, tmp_path, monkeypatch, caplog):
    data, cache = _jsonl(tmp_path / "a.jsonl"), tmp_path / "cache"
    first = _start_slow_build(data, cache, tmp_path / "marks")

    def no_build(*a, **k):
        raise AssertionError("built a second time")
    monkeypatch.setattr(prepare_mod, "_build", no_build)

    def release_first_when_waiting(message, *args):
        (tmp_path / "marks" / "release").touch()  # the first build goes on only once this one waits
    with caplog.at_level(logging.INFO):
        monkeypatch.setattr(prepare_mod.logger, "warning", release_first_when_waiting)
        second = prepare_data([str(data)], tok, tokenizer_name="gpt2", cache_dir=cache, val_fraction=0.1)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and "built" in out, err[-3000:]
    assert (tmp_path / "marks" / "release").exists()  # it did wait: the first build was held until then
    assert "prepared by the process waited for" in caplog.text
    assert len(second.train) > 0
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []  # no lock, tmp or scratch


def test_the_leftovers_of_a_killed_build_are_removed_by_the_next_one(tok, tmp_path):
    data, cache = _jsonl(tmp_path / "a.jsonl"), tmp_path / "cache"
    killed = _start_slow_build(data, cache, tmp_path / "marks")
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    left = [p.name for p in cache.iterdir() if ".scratch-" in p.name]
    assert left, list(cache.iterdir())  # the scratch folder the killed build was writing
    other = cache / ".0123456789abcdef0123.tmp-keep"  # another entry's build in progress: not ours to touch
    other.mkdir()
    again = prepare_data([str(data)], tok, tokenizer_name="gpt2", cache_dir=cache, val_fraction=0.1)
    assert len(again.train) > 0
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == [other.name]
    whole = prepare_data([str(data)], tok, tokenizer_name="gpt2", cache_dir=tmp_path / "fresh", val_fraction=0.1)
    assert np.array_equal(again.train, whole.train) and np.array_equal(again.val, whole.val)


def test_an_entry_being_built_is_not_taken_for_leftovers(tok, tmp_path):
    """While a build holds the entry's lock, another process only waits: it removes nothing of the builder's."""
    data, cache = _jsonl(tmp_path / "a.jsonl"), tmp_path / "cache"
    first = _start_slow_build(data, cache, tmp_path / "marks")
    scratch = [p for p in cache.iterdir() if ".scratch-" in p.name]
    log = tmp_path / "waiter.err"
    with open(log, "w") as err_file:
        waiter = subprocess.Popen(
            [sys.executable, "-c", "import sys; from staged_fast.data import prepare_data; "
             "from staged_fast.tokenizer import load_tokenizer; "
             "prepare_data([sys.argv[1]], load_tokenizer('gpt2'), tokenizer_name='gpt2', cache_dir=sys.argv[2], "
             "val_fraction=0.1); print('opened')", str(data), str(cache)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=err_file, text=True)
        deadline = time.time() + 120
        while "waiting for it to finish" not in log.read_text():
            assert waiter.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        assert scratch and all(p.exists() for p in scratch)  # blocked on the lock, it removed nothing
        (tmp_path / "marks" / "release").touch()
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err[-3000:]
        out, _ = waiter.communicate(timeout=120)
    assert waiter.returncode == 0 and "opened" in out, log.read_text()[-3000:]
    assert "another process is preparing this data (pid" in log.read_text()
