"""Bad input to the trainer: a clear one-paragraph error, exit code 2, and nothing overwritten."""
import hashlib
from pathlib import Path

import pytest

from train_utils import train


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_cache):
    run = tmp_path_factory.mktemp("runs") / "done"
    assert train(run, data_cache, "--train_steps", "3") == 0
    return run


def _fails(capsys, code, *fragments):
    err = capsys.readouterr().err
    assert code == 2, err
    assert any(line.startswith("error: ") for line in err.splitlines()), err
    for f in fragments:
        assert f in err, err
    return err


@pytest.mark.parametrize("flags, fragments", [
    (["--size", "GPT5"], ["Unknown model size 'GPT5'", "GPT2_base"]),
    (["--size", "tiny", "--n_layer", "2", "--n_embd", "100", "--n_head", "3"], ["not divisible by n_head=3"]),
    (["--seqlen", "2048"], ["--seqlen 2048 exceeds", "n_positions=1024"]),
    (["--fp16", "--bf16"], ["exclusive"]),
    (["--grow_at", "5,10", "--grow_ops", "width"], ["one operator per growth"]),
    (["--grow_ops", "wider"], ["unknown operator 'wider'"]),
])
def test_bad_flags(tmp_path, data_cache, capsys, flags, fragments):
    run = tmp_path / "run"
    _fails(capsys, train(run, data_cache, "--train_steps", "2", *flags), *fragments)
    assert not run.exists()


def test_missing_data(tmp_path, data_cache, capsys):
    run = tmp_path / "run"
    code = train(run, data_cache, "--train_steps", "2", "--data", str(tmp_path / "nope.txt"))
    _fails(capsys, code, "nope.txt")
    assert not run.exists()


def test_empty_data(tmp_path, data_cache, capsys):
    (tmp_path / "empty.txt").write_text("")
    run = tmp_path / "run"
    err = _fails(capsys, train(run, data_cache, "--train_steps", "2", "--data", str(tmp_path / "empty.txt")))
    assert "empty" in err.lower() or "no tokens" in err.lower()
    assert not run.exists()


def test_folder_holding_another_run(finished_run, data_cache, capsys):
    before = _snapshot(finished_run)
    _fails(capsys, train(finished_run, data_cache, "--train_steps", "3"), "already holds another run", "--resume latest")
    assert _snapshot(finished_run) == before


def test_corrupt_checkpoint(finished_run, tmp_path, data_cache, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    weights = next(run.glob("step_*/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    before = _snapshot(run)
    _fails(capsys, train(run, data_cache, "--train_steps", "6", "--resume", "latest"), "corrupt", "earlier checkpoint")
    assert _snapshot(run) == before


def test_other_size_without_growth_flag(finished_run, tmp_path, data_cache, capsys):
    before = _snapshot(finished_run)
    code = train(tmp_path / "new", data_cache, "--train_steps", "6", "--resume", str(finished_run), "--size", "small")
    _fails(capsys, code, "2L/128d/2H", "4L/256d/4H", "--doubling")
    assert _snapshot(finished_run) == before
    assert not (tmp_path / "new").exists()


def test_restart_steps_on_plain_resume_is_refused(finished_run, tmp_path, data_cache, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    before = _snapshot(run)
    _fails(capsys, train(run, data_cache, "--train_steps", "6", "--resume", "latest", "--restart_steps", "1"),
           "was not just grown")
    assert _snapshot(run) == before
