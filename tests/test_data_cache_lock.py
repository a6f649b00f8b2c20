"""The data cache under a cluster's habits: two jobs preparing the same data at once, and builds killed midway."""
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import staged_fast.data.prepare as prepare_mod
from staged_fast.data import DataError, prepare_data

ROOT = Path(__file__).resolve().parents[1]
DOCS = [f"Record {i}: a slow barge carries {'coal and ' * (i % 4 + 1)}salt down the river." for i in range(40)]

# A build that stops as it starts to tokenize until the file `release` appears; argv:
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


# A build killed (os._exit, as by kill -9) as it starts to tokenize chunk `finish` + 1, leaving a partial map output
# in its work folder as datasets would; argv: data file, cache folder, chunks to finish, workers.
KILLED_BUILD = r"""
import os, sys
from pathlib import Path
import datasets
import staged_fast.data.prepare as P
import staged_fast.data.text_pieces as pieces
from staged_fast.tokenizer import load_tokenizer

data, cache, finish, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
P.CHUNK_TEXT_BYTES, pieces.PIECE_CHARS = 400, 48
real_map, started = datasets.Dataset.map, []
def map_then_die(self, *a, **k):
    if len(started) == finish:
        (Path(k["cache_file_name"]).parent / "tmpk1ll3d").write_bytes(b"half an arrow file")
        os._exit(9)
    started.append(1)
    return real_map(self, *a, **k)
datasets.Dataset.map = map_then_die
P.prepare_data([data], load_tokenizer("gpt2"), tokenizer_name="gpt2", cache_dir=cache, val_fraction=0.1,
               num_proc=workers)
"""


@pytest.mark.parametrize("kind,workers", [("jsonl", 2), ("txt", 1)])
def test_a_killed_build_resumes_from_the_chunks_it_finished(tok, tmp_path, monkeypatch, caplog, record_encoded,
                                                             kind, workers):
    """Killed after 2 chunks (with 2 workers: each chunk is two shard files), the same preparation run again
    tokenizes only the chunks after them, with 1 worker (the chunks do not depend on it), reads a .txt file's
    pieces back instead of cutting it again, and gives the tokens of an uninterrupted build."""
    import staged_fast.data.sources as sources_mod
    import staged_fast.data.text_pieces as text_pieces_mod

    data = _jsonl(tmp_path / "a.jsonl") if kind == "jsonl" else tmp_path / "a.txt"
    if kind == "txt":
        data.write_text("\n".join(DOCS))
    cache = tmp_path / "cache"
    killed = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(data), str(cache), "2", str(workers)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-3000:]
    (work,) = [p for p in cache.iterdir() if p.name.endswith(".work")]
    assert (work / "tmpk1ll3d").exists()

    monkeypatch.setattr(prepare_mod, "CHUNK_TEXT_BYTES", 400)
    monkeypatch.setattr(text_pieces_mod, "PIECE_CHARS", 48)
    fresh_seen = record_encoded([])
    fresh = prepare_data([str(data)], tok, tokenizer_name="gpt2", cache_dir=tmp_path / "fresh", val_fraction=0.1)

    def no_cutting(*a, **k):
        raise AssertionError("the .txt file was cut into pieces again")
    monkeypatch.setattr(sources_mod, "_text_rows", no_cutting)
    real_write, work_at_write = prepare_mod._write, []

    def write(*a, **k):
        work_at_write.extend(p.name for p in work.iterdir())
        return real_write(*a, **k)
    monkeypatch.setattr(prepare_mod, "_write", write)
    seen = record_encoded([])
    with caplog.at_level(logging.INFO):
        again = prepare_data([str(data)], tok, tokenizer_name="gpt2", cache_dir=cache, val_fraction=0.1)
    n_chunks = int(re.search(r"resuming an interrupted preparation: 2 of (\d+) chunks", caplog.text)[1])
    assert n_chunks > 3
    assert 0 < len(seen) < len(fresh_seen) and seen == fresh_seen[-len(seen):]  # only the chunks after the two
    assert "tmpk1ll3d" not in work_at_write  # the killed map's partial output was removed
    assert np.array_equal(again.train, fresh.train) and np.array_equal(again.val, fresh.val)
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []  # the work folder went


def test_the_leftovers_of_killed_writes_are_removed_by_the_next_build(tok, tmp_path):
    data = _jsonl(tmp_path / "a.jsonl")
    whole = prepare_data([str(data)], tok, tokenizer_name="gpt2", cache_dir=tmp_path / "fresh", val_fraction=0.1)
    cache, fp = tmp_path / "cache", whole.fingerprint
    for name in (f".{fp}.tmp-abc", f".{fp}.scratch-def", ".0123456789abcdef0123.tmp-keep"):
        (cache / name).mkdir(parents=True)  # a killed write, an old version's scratch; another entry's build
        (cache / name / "train.bin").write_bytes(b"\0" * 64)
    again = prepare_data([str(data)], tok, tokenizer_name="gpt2", cache_dir=cache, val_fraction=0.1)
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == [".0123456789abcdef0123.tmp-keep"]
    assert np.array_equal(again.train, whole.train) and np.array_equal(again.val, whole.val)


def test_an_interrupted_build_keeps_its_work_through_load_errors_and_other_splits(tok, tmp_path, monkeypatch,
                                                                                   caplog):
    """Stopped after tokenizing, the work stays and says so; a rerun that fails to load its input (a network
    outage, a file being copied: DataError) keeps it too (it was deleted); a rerun with another --val_fraction
    resumes from it (the work is keyed by the input and tokenizer alone); tokens that cannot make an entry
    (every document empty) take their work with them."""
    import staged_fast.data.sources as sources_mod

    data, cache = _jsonl(tmp_path / "a.jsonl"), tmp_path / "cache"
    real_write, real_load = prepare_mod._write, prepare_mod.load_texts

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare_mod, "_write", interrupted)
    with caplog.at_level(logging.INFO), pytest.raises(KeyboardInterrupt):
        prepare_data([str(data)], tok, tokenizer_name="gpt2", cache_dir=cache, val_fraction=0.1)
    assert "the same command resumes from it" in caplog.text
    (work,) = [p for p in cache.iterdir() if p.name.endswith(".work")]
    assert list(work.glob("staged_fast-v3-*.arrow"))
    monkeypatch.setattr(prepare_mod, "_write", real_write)

    def outage(*a, **k):
        raise sources_mod.DataError("Could not load the hub dataset: ConnectionError")
    monkeypatch.setattr(prepare_mod, "load_texts", outage)
    with pytest.raises(DataError, match="ConnectionError"):
        prepare_data([str(data)], tok, tokenizer_name="gpt2", cache_dir=cache, val_fraction=0.1)
    assert list(work.glob("staged_fast-v3-*.arrow"))
    monkeypatch.setattr(prepare_mod, "load_texts", real_load)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        done = prepare_data([str(data)], tok, tokenizer_name="gpt2", cache_dir=cache, val_fraction=0.2)
    assert "resuming an interrupted preparation: 1 of 1 chunks" in caplog.text and len(done.train) > 0
    assert not work.exists()

    empty = tmp_path / "empty.jsonl"  # the tokens cannot make an entry: no rerun of this input can use them
    empty.write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(5)))
    with pytest.raises(DataError, match="every document is empty"):
        prepare_data([str(empty)], tok, tokenizer_name="gpt2", cache_dir=cache, val_fraction=0.1)
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []


def test_a_builder_seen_alive_in_the_work_folder_is_left_alone(tok, tmp_path, caplog):
    """Locks that do not reach across nodes (Lustre localflock, NFS nolock) let a second node's builder in:
    it sees the first one's fresh marker and tokenizes privately, removing nothing of the first one's; a
    marker not touched for longer than STALE is a dead builder's, and its work is resumed."""
    import time as time_mod

    data, cache = _jsonl(tmp_path / "a.jsonl"), tmp_path / "cache"
    key = prepare_mod._tokens_key(prepare_mod.resolve_source([str(data)], text_field="text"), tok, "gpt2")
    work = cache / f".tokens-{key}.work"
    work.mkdir(parents=True)
    alive, partial = work / ".builder-othernode-4242", work / "tmpinflight"
    alive.touch()
    partial.write_bytes(b"the other node's map output being written")
    (cache / ".tokens-0123456789abcdef0123.work").mkdir()  # another input's interrupted build: only mentioned
    with caplog.at_level(logging.INFO):
        built = prepare_data([str(data)], tok, tokenizer_name="gpt2", cache_dir=cache, val_fraction=0.1)
    assert len(built.train) > 0 and "another builder is alive in" in caplog.text
    assert alive.exists() and partial.exists()  # nothing of the live builder's was touched
    assert not [p for p in cache.iterdir() if ".scratch-" in p.name]  # the private folder went with the build
    stale = time_mod.time() - 2 * prepare_mod._Heartbeat.STALE
    os.utime(alive, (stale, stale))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = prepare_data([str(data)], tok, tokenizer_name="gpt2", cache_dir=cache, val_fraction=0.3)
    assert "another builder is alive" not in caplog.text and not work.exists()
    assert "1 work folder(s) of other preparations" in caplog.text
    assert len(again.val) > 0


def test_an_entry_being_built_is_not_taken_for_leftovers(tok, tmp_path):
    """While a build holds the entry's lock, another process only waits: it removes nothing of the builder's."""
    data, cache = _jsonl(tmp_path / "a.jsonl"), tmp_path / "cache"
    first = _start_slow_build(data, cache, tmp_path / "marks")
    (work,) = [p.with_suffix(".work") for p in cache.iterdir() if p.name.endswith(".lock")]
    work.mkdir(exist_ok=True)
    (work / "tmpinflight").write_bytes(b"the builder's map output being written")
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
        assert (work / "tmpinflight").exists()  # blocked on the lock, it removed nothing
        (tmp_path / "marks" / "release").touch()
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err[-3000:]
        out, _ = waiter.communicate(timeout=120)
    assert waiter.returncode == 0 and "opened" in out, log.read_text()[-3000:]
    assert "another process is preparing this data (pid" in log.read_text()


def test_without_flock_a_build_works_in_a_private_folder_it_removes(tok, tmp_path, monkeypatch, caplog):
    """A filesystem without flock (some NFS mounts): nothing keeps a second builder out, so the work folder is
    private to the build (no resume; racing builders must not share files) and goes with it, failed or not."""
    import errno
    import fcntl
    import types

    import staged_fast.run_folder as run_folder_mod

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    # the lock's module alone (datasets locks its own files)
    monkeypatch.setattr(run_folder_mod, "fcntl", types.SimpleNamespace(**{**vars(fcntl), "flock": no_flock}))
    data, cache = _jsonl(tmp_path / "a.jsonl"), tmp_path / "cache"
    real_write, during = prepare_mod._write, []

    def write(*a, **k):
        during.extend(p.name for p in cache.iterdir())
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare_mod, "_write", write)
    with caplog.at_level(logging.INFO), pytest.raises(KeyboardInterrupt):
        prepare_data([str(data)], tok, tokenizer_name="gpt2", cache_dir=cache, val_fraction=0.1)
    assert "cannot lock" in caplog.text and any(".scratch-" in name for name in during)
    monkeypatch.setattr(prepare_mod, "_write", real_write)
    done = prepare_data([str(data)], tok, tokenizer_name="gpt2", cache_dir=cache, val_fraction=0.1)
    assert len(done.train) > 0
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == [
        f".tokens-{prepare_mod._tokens_key(prepare_mod.resolve_source([str(data)], text_field='text'), tok, 'gpt2')}.lock"]


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_builders_marker_is_kept_fresh_while_it_builds_and_goes_with_it(tmp_path, monkeypatch):
    """The marker is touched while the build runs; another's fresh marker is alive, one of a finished process
    of this host is not (a killed builder's stays behind: its requeue on this host must not wait STALE)."""
    import socket
    import time as time_mod

    monkeypatch.setattr(prepare_mod._Heartbeat, "PERIOD", 0.05)
    heartbeat = prepare_mod._Heartbeat.start(tmp_path / "work")
    marker = heartbeat.marker
    (tmp_path / "work" / ".builder-thishost-1").touch()  # fresh, another host's: alive
    assert heartbeat.others_alive()
    dead = tmp_path / "work" / f".builder-{socket.gethostname()}-{_dead_pid()}"  # this host's, its process gone
    (tmp_path / "work" / ".builder-thishost-1").unlink()
    dead.touch()
    assert not heartbeat.others_alive() and not dead.exists()
    old = time_mod.time() - 1000
    os.utime(marker, (old, old))
    time_mod.sleep(0.5)
    assert time_mod.time() - marker.stat().st_mtime < 5  # touched again since
    heartbeat.stop()
    assert not marker.exists() and not (tmp_path / "work").exists()  # made for the marker alone: it went too
