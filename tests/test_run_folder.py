"""One owner per run folder (--save_prefix): an exclusive lock, leftovers of interrupted writes removed at
start, a folder holding only leftovers is a fresh start, and metrics.jsonl keeps one line per update across
a kill -9 and a resume."""
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from staged_fast.checkpoint import list_checkpoints, load_checkpoint
from staged_fast.metrics import read_metrics
from train_utils import train


def _update_iterations(run: Path) -> list[int]:
    return [r["iteration"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r and "event" not in r]


def test_metrics_one_line_per_update_after_kill_and_resume(tmp_path, data_cache):
    run = tmp_path / "run"
    flags = ["--train_steps", "8", "--save_every", "3", "--keep_last", "0"]
    assert train(run, data_cache, *flags, "--stop_at_step", "5") == 0  # checkpoints 3 and 5, records 1..5
    # kill -9 after update 5 was logged but before its checkpoint was renamed into place, in the middle of
    # writing the next record: the latest checkpoint is 3, the log holds 1..5 and a torn line
    shutil.rmtree(run / "step_00000005")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "iterat')
    assert train(run, data_cache, *flags, "--resume", "latest") == 0
    assert _update_iterations(run) == list(range(1, 9))


def test_leftover_tmp_folders_are_removed_at_start_by_the_owner(tmp_path, data_cache):
    run = tmp_path / "run"
    assert train(run, data_cache, "--train_steps", "6", "--stop_at_step", "3") == 0
    for name in (".tmp-step_00000004-4242", ".tmp-old-step_00000003-4243", ".tmp-del-step_00000001-4244"):
        (run / name).mkdir()
        (run / name / "model.safetensors").write_bytes(b"\0" * 4096)
    assert train(run, data_cache, "--train_steps", "6", "--resume", "latest") == 0
    assert not list(run.glob(".tmp-*"))
    assert _update_iterations(run) == list(range(1, 7))


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume_latest"])
def test_prefix_with_only_leftovers_is_a_fresh_start(tmp_path, data_cache, resume):
    run = tmp_path / "run"
    assert train(run, data_cache, "--train_steps", "3") == 0
    # a kill during the very first checkpoint write: metrics.jsonl, run.json and a partial .tmp- folder
    (ckpt,) = list_checkpoints(run)
    partial = run / f".tmp-{ckpt.name}-4242"
    ckpt.rename(partial)
    (partial / "meta.json").unlink()
    assert train(run, data_cache, "--train_steps", "3", *(["--resume", "latest"] if resume else [])) == 0
    assert [p.name for p in list_checkpoints(run)] == ["step_00000003"]
    assert _update_iterations(run) == [1, 2, 3]
    assert not list(run.glob(".tmp-*"))


HOLD_LOCK = (
    "import sys, time\n"
    "from staged_fast.run_folder import RunLock\n"
    "RunLock(sys.argv[1]).acquire()\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


def test_second_run_on_a_locked_prefix_exits_2_naming_the_holder(tmp_path, data_cache, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train(run, data_cache, "--train_steps", "3") == 2
        err = capsys.readouterr().err
        assert "error: " in err and "in use by another run" in err
        assert f"pid {holder.pid}" in err and socket.gethostname() in err
        assert not list_checkpoints(run) and not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock is stale, the next run takes the prefix over (and releases it at exit)
    assert train(run, data_cache, "--train_steps", "3") == 0
    assert load_checkpoint(list_checkpoints(run)[-1]).trainer_state["iteration"] == 3
    from staged_fast.run_folder import RunLock

    lock = RunLock(run)
    lock.acquire()
    lock.release()
