"""--profile START[:COUNT]: a torch.profiler window over training updates, a trace per rank and an op table."""
import json

import pytest

from staged_fast.profiling import parse_window
from train_utils import train


def _steps(trace):
    events = json.loads(trace.read_text())["traceEvents"]
    return sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}), events


def test_a_window_of_updates_is_traced_and_tabled(tmp_path, data_cache, capsys):
    assert train(tmp_path / "run", data_cache, "--train_steps", "5", "--profile", "2:2") == 0
    out = capsys.readouterr().out
    trace = tmp_path / "run" / "profile" / "rank0_updates2-3.json"
    assert trace.exists(), sorted((tmp_path / "run").rglob("*"))
    steps, events = _steps(trace)
    assert len(steps) == 2, steps  # the warm-up update (1) is not recorded
    assert any(e.get("name", "").startswith("aten::") for e in events)
    assert "profile of updates 2-3 (rank 0), by self_cpu_time_total" in out and "Self CPU" in out
    assert str(trace) in out


def test_a_window_cut_short_by_the_end_of_the_run_is_still_written(tmp_path, data_cache):
    assert train(tmp_path / "run", data_cache, "--train_steps", "3", "--profile", "2:5") == 0
    steps, _ = _steps(tmp_path / "run" / "profile" / "rank0_updates2-3.json")
    # updates 2 and 3, and the step the last profiler.step() opened, closed at once by the run's end
    assert {"ProfilerStep#1", "ProfilerStep#2"} <= set(steps), steps


def test_a_run_stopped_in_the_warm_up_update_writes_nothing_and_a_late_window_is_warned(tmp_path, data_cache,
                                                                                         capsys):
    """Stopped at update 2 with --profile 3:2: an empty table and a trace named 'updates 3-2' were written."""
    assert train(tmp_path / "run", data_cache, "--train_steps", "8", "--profile", "3:2", "--stop_at_step", "2") == 0
    assert "the run stopped at update 2, before the window; nothing profiled" in capsys.readouterr().out
    assert not (tmp_path / "run" / "profile").exists() or not list((tmp_path / "run" / "profile").iterdir())
    assert train(tmp_path / "late", data_cache, "--train_steps", "2", "--profile", "10") == 0
    assert "--profile 10 starts at update 10, and the run ends at update 2" in capsys.readouterr().err


def test_a_run_resumed_after_the_window_says_so_and_profiles_nothing(tmp_path, data_cache, capsys):
    assert train(tmp_path / "run", data_cache, "--train_steps", "4", "--stop_at_step", "3") == 0
    capsys.readouterr()
    assert train(tmp_path / "run", data_cache, "--train_steps", "4", "--resume", "latest", "--profile", "2") == 0
    assert "the run starts at update 4, after the window; nothing profiled" in capsys.readouterr().out
    assert not (tmp_path / "run" / "profile").exists()


def test_a_run_resumed_at_the_window_start_profiles_it_without_a_warm_up(tmp_path, data_cache, capsys, recwarn):
    """No update before the window to warm the profiler up: both updates are recorded, and the run says so in one
    note instead of torch's warning."""
    assert train(tmp_path / "run", data_cache, "--train_steps", "4", "--stop_at_step", "1") == 0
    capsys.readouterr()
    assert train(tmp_path / "run", data_cache, "--train_steps", "4", "--resume", "latest", "--profile", "2:2") == 0
    steps, _ = _steps(tmp_path / "run" / "profile" / "rank0_updates2-3.json")
    assert len(steps) == 2, steps
    out = capsys.readouterr().out
    assert out.count("note: --profile 2:2 starts at the run's first update, with none before it to warm") == 1, out
    assert not [w for w in recwarn if "warmup" in str(w.message)], [str(w.message) for w in recwarn]


def test_a_trace_that_cannot_be_written_is_a_warning_not_a_crash(tmp_path, data_cache, capsys, monkeypatch):
    import errno

    import torch.profiler

    def full_disk(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(torch.profiler.profile, "export_chrome_trace", full_disk)
    assert train(tmp_path / "run", data_cache, "--train_steps", "3", "--profile", "1:1") == 0
    out = capsys.readouterr().out
    assert "warning: could not write the profile trace" in out and "No space left on device" in out
    assert "trace: not written" in out


@pytest.mark.parametrize("spec", ["0", "2:0", "two", "1:2:3", ":3", ""])
def test_a_malformed_window_is_refused_with_its_form(spec, tmp_path, data_cache, capsys):
    with pytest.raises(ValueError, match="START or START:COUNT"):
        parse_window(spec)
    assert train(tmp_path / "run", data_cache, "--train_steps", "2", "--profile", spec) == 2
    assert "--profile takes START or START:COUNT" in capsys.readouterr().err


def test_the_count_defaults_to_three():
    assert parse_window("7") == (7, 3) and parse_window("7:1") == (7, 1)


def test_every_rank_writes_its_own_trace(tmp_path, data_cache):
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "staged_fast.train",
         "--size", "tiny", "--seqlen", "32", "--batch_size", "1", "--train_steps", "3", "--warmup_steps", "1",
         "--val_every", "1000", "--no_progress", "--device", "cpu", "--profile", "2:1", "--cache_dir", data_cache,
         "--save_prefix", str(tmp_path / "run")], env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
        text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        steps, _ = _steps(tmp_path / "run" / "profile" / f"rank{rank}_updates2-2.json")
        assert len(steps) == 1, (rank, steps)
    assert proc.stdout.count("profile of updates 2-2 (rank 0)") == 1
