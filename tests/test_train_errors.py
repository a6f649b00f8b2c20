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
    pytest.param(["--kernels", "triton", "--n_layer", "1", "--n_embd", "80", "--n_head", "1"],
                 ["--kernels triton", "head_dim 16, 32, 64, 96, 128", "is 80", "--kernels torch"], id="triton_head_dim_80"),
    pytest.param(["--lr", "-0.001"], ["--lr must be positive, got -0.001"], id="negative_lr"),
    pytest.param(["--warmup_steps", "-1"], ["--warmup_steps must be 0 or more, got -1"], id="negative_warmup"),
    pytest.param(["--stop_at_step", "-1"], ["--stop_at_step must be 1 or more, got -1"], id="negative_stop_at_step"),
    pytest.param(["--keep_last", "-1"], ["--keep_last must be 0 (keep all) or more, got -1"], id="negative_keep_last"),
    pytest.param(["--width_noise", "-0.1"], ["--width_noise must be 0 or more"], id="negative_width_noise"),
    pytest.param(["--grow_at", "5", "--grow_ops", "width"], ["--grow_at 5 is never reached", "--train_steps 2"],
                 id="grow_at_beyond_train_steps"),
    pytest.param(["--grow_at", "2,12", "--grow_ops", "width,width", "--train_steps", "8", "--restart_steps", "1"],
                 ["--grow_at 12 is never reached"], id="second_growth_never_reached"),
    pytest.param(["--grow_at", "4,2", "--grow_ops", "width,width", "--train_steps", "8"], ["increasing"],
                 id="grow_at_not_increasing"),
    pytest.param(["--restart_steps", "3"], ["--restart_steps", "no growth"], id="restart_steps_without_growth"),
    pytest.param(["--grow_at", "1", "--grow_ops", "width", "--restart_steps", "100"],
                 ["sets the step counter to 100", "would never train"], id="restart_steps_past_the_end"),
    pytest.param(["--lr", "0.001", "--min_lr", "0.01"], ["--min_lr 0.01 is above the peak --lr 0.001"],
                 id="min_lr_above_lr"),
    # was accepted, then refused after the data and model were built with a false "fewer than one batch"
    pytest.param(["--val_batches", "0"], ["--val_batches must be positive, got 0"], id="zero_val_batches"),
    pytest.param(["--gpu_count", "0"], ["--gpu_count must be 1 or more, or -1"], id="zero_gpu_count"),
    # a --resume latest that finds no checkpoint is a fresh run: checked before the data, as without it
    pytest.param(["--seqlen", "2048", "--resume", "latest"], ["--seqlen 2048 exceeds", "n_positions=1024"],
                 id="seqlen_fresh_resume_latest"),
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
    _fails(capsys, train(run, data_cache, "--train_steps", "3", "--resume", "latest"), "corrupt", "earlier checkpoint")
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
    _fails(capsys, train(run, data_cache, "--train_steps", "3", "--resume", "latest", "--restart_steps", "1"),
           "was not just grown")
    assert _snapshot(run) == before


def test_warmup_longer_than_training_is_warned_about_once(tmp_path, data_cache, capsys):
    assert train(tmp_path / "run", data_cache, "--train_steps", "2", "--warmup_steps", "5") == 0
    err = capsys.readouterr().err
    assert err.count("warning: --warmup_steps 5 is longer than --train_steps 2") == 1, err


def test_unknown_attention_dq_mode_exits_2_before_training(tmp_path, data_cache, capsys, monkeypatch):
    monkeypatch.setenv("STAGED_FAST_ATTN_DQ", "fastest")
    run = tmp_path / "run"
    _fails(capsys, train(run, data_cache, "--train_steps", "2"), "STAGED_FAST_ATTN_DQ='fastest'", "atomic, split")
    assert not run.exists()


def test_kernels_auto_runs_sdpa_attention_for_a_head_dim_the_flash_kernel_lacks(tmp_path, small_vocab, capsys,
                                                                                 monkeypatch):
    """On CUDA --kernels auto picks Triton; a model whose head_dim the flash kernel is not built for (80 here)
    crashed at its first forward with the kernel's ValueError (a traceback, exit 1). Now its attention runs
    SDPA and the other Triton kernels stay (the norms; the fused loss, the memory saver), and it says so;
    a growth keeps the split."""
    import staged_fast.trainer as trainer_module
    from staged_fast import kernels
    from staged_fast.kernels import attention

    tokenizer, cache = small_vocab
    calls = []
    monkeypatch.setattr(trainer_module, "resolve_backend", lambda name, device: "triton")  # auto, as on CUDA
    for name in ("layer_norm_residual", "linear_cross_entropy"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: calls.append((_name, k.get(
            "backend", a[-1] if isinstance(a[-1], str) else None))) or _real(*a, **k))
    monkeypatch.setattr(attention, "flash_attention", lambda *a, **k: pytest.fail("the flash kernel ran"))
    run = tmp_path / "run"
    assert train(run, cache, "--train_steps", "2", "--n_layer", "1", "--n_embd", "80", "--n_head", "1", "--seqlen",
                 "16", "--batch_size", "2", "--tokenizer", tokenizer, "--grow_at", "1", "--grow_ops", "width",
                 "--val_batches", "1") == 0
    out = capsys.readouterr()
    assert "head_dim 80 is not one the flash attention kernel is built for" in out.out + out.err
    assert "attention runs PyTorch's SDPA, the other Triton kernels stay" in out.out + out.err
    assert {n for n, b in calls if b == "triton"} == {"layer_norm_residual", "linear_cross_entropy"}, calls
    assert not [c for c in calls if c[1] != "triton"], calls


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu(tmp_path, data_cache, capsys):
    run = tmp_path / "run"
    _fails(capsys, train(run, data_cache, "--train_steps", "2", "--device", "cuda"), "--device cuda", "--device cpu")
    assert not run.exists()


def test_save_prefix_that_is_a_file(tmp_path, data_cache, capsys):
    prefix = tmp_path / "notes.txt"
    prefix.write_text("mine")
    _fails(capsys, train(prefix, data_cache, "--train_steps", "2"), "is a file", "--save_prefix")
    assert prefix.read_text() == "mine"
    _fails(capsys, train(prefix / "run", data_cache, "--train_steps", "2"), "is a file")
    assert prefix.read_text() == "mine"


def test_unwritable_save_prefix(tmp_path, data_cache, capsys, monkeypatch):
    import os

    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: show the check what an ordinary user would see
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == parent and mode & os.W_OK
                            else real(p, mode, *a, **k))
    try:
        _fails(capsys, train(parent / "run", data_cache, "--train_steps", "2"), "not writable", str(parent))
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_missing_tokenizer_folder(tmp_path, data_cache, capsys):
    run = tmp_path / "run"
    _fails(capsys, train(run, data_cache, "--train_steps", "2", "--tokenizer", str(tmp_path / "tok")),
           "--tokenizer", "no such folder")
    assert not run.exists()


def test_a_cache_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "cache").write_text("a file, not a folder")
    run = tmp_path / "run"
    _fails(capsys, train(run, str(tmp_path / "cache" / "sub"), "--train_steps", "2"), "--cache_dir",
           "lies under a file")
    assert not run.exists()


def test_missing_model_path(tmp_path, data_cache, capsys):
    run = tmp_path / "run"
    _fails(capsys, train(run, data_cache, "--train_steps", "2", "--model", str(tmp_path / "gpt2-folder")),
           "--model", "no such folder")
    assert not run.exists()


def test_seqlen_beyond_the_model_folders_positions(tmp_path, data_cache, capsys):
    from staged_fast.config import GPTConfig
    from staged_fast.hf import save_pretrained
    from staged_fast.model import GPT

    folder = tmp_path / "hf"
    save_pretrained(GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, n_positions=32)), folder)
    run = tmp_path / "run"
    _fails(capsys, train(run, data_cache, "--train_steps", "2", "--model", str(folder), "--seqlen", "64"),
           "--seqlen 64", "n_positions=32")
    assert not run.exists()


def _model_folder(path: Path, **shape) -> Path:
    from staged_fast.config import GPTConfig
    from staged_fast.hf import save_pretrained
    from staged_fast.model import GPT

    save_pretrained(GPT(GPTConfig(**{"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64, **shape})), path)
    return path


def test_a_model_folders_own_shape_is_checked_not_the_flags(tmp_path, data_cache, capsys):
    """--model's weights decide the shape: their vocab against the tokenizer's, their head_dim against the
    kernels, before training (a vocab of 1000 under GPT-2's tokenizer was an IndexError at the first step, a
    head_dim of 24 under --kernels triton a traceback at the first forward: the flags' GPT2_base was checked)."""
    small_vocab = _model_folder(tmp_path / "vocab1000", arch="llama", vocab_size=1000)
    _fails(capsys, train(tmp_path / "a", data_cache, "--train_steps", "2", "--model", str(small_vocab), "--seqlen", "16"),
           "vocab_size 1000 is smaller than the tokenizer's 50257")
    head_dim_24 = _model_folder(tmp_path / "hd24", arch="llama", n_embd=48)
    _fails(capsys, train(tmp_path / "b", data_cache, "--train_steps", "2", "--model", str(head_dim_24), "--seqlen",
                         "16", "--kernels", "triton"), "this model's is 24")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_model_folder_with_a_longer_context_than_the_flags_trains_at_its_length(tmp_path, small_vocab):
    """--seqlen is checked against the folder's context (1100 here), not --n_positions' default 1024, and so is
    the continuation of that run (its checkpoint's context: the flags' 1024 refused it)."""
    tokenizer, cache = small_vocab  # a 512-token vocabulary: 1100 positions of GPT-2's 50257 logits are slow
    folder = _model_folder(tmp_path / "hf", n_positions=1100, vocab_size=512)
    flags = ["--train_steps", "2", "--seqlen", "1100", "--batch_size", "1", "--val_batches", "1", "--tokenizer",
             tokenizer]
    assert train(tmp_path / "run", cache, *flags, "--model", str(folder), "--stop_at_step", "1") == 0
    from staged_fast.train import main

    assert main(["--resume", "latest", "--save_prefix", str(tmp_path / "run"), "--no_progress"]) == 0


def test_a_plan_sets_its_growths_and_takes_its_own_length(tmp_path, data_cache, capsys):
    """--restart_steps, --restart_warmup_steps and --grow_ops beside --schedule did nothing (the plan's were
    used, silently); a --train_steps equal to the plan's own (its updates) was refused, with a fix that led back
    to the same plan."""
    from staged_fast.schedule import plan_for_run

    path = tmp_path / "plan.json"
    plan = plan_for_run("tiny", ["width"], train_steps=12)
    path.write_text(plan.to_json())
    for flags in (["--restart_steps", "3"], ["--grow_ops", "alternate_id", "--restart_warmup_steps", "2"]):
        _fails(capsys, train(tmp_path / "a", data_cache, "--schedule", str(path), *flags),
               "with --schedule: the plan sets each growth's operator, restart step and warmup")
    final = plan.to_dict()["final_schedule_step"]
    assert final < 12  # the growth restarts the counter: the two lengths differ
    _fails(capsys, train(tmp_path / "b", data_cache, "--schedule", str(path), "--train_steps", "20"),
           "which takes 12 updates", f"its step counter ends at {final}", "plan --train_steps 20")
    same = ["--schedule", str(path), "--train_steps", "12", "--resume", "latest"]
    assert train(tmp_path / "c", data_cache, *same, "--stop_at_step", "1") == 0
    assert train(tmp_path / "c", data_cache, *same, "--stop_at_step", "2") == 0  # its requeue: the same flags


def test_plan_whose_stages_are_not_doublings(tmp_path, data_cache, capsys):
    import json

    from staged_fast.schedule import plan_for_run

    plan = plan_for_run("tiny", ["width"], train_steps=12).to_dict()
    plan["stages"][0].update(n_embd=96, n_head=1)  # 96d -> 128d: not what width growth makes
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    run = tmp_path / "run"
    _fails(capsys, train(run, data_cache, "--schedule", str(path)), "not a doubling", "2L/96d/1H", "2L/128d/2H")
    assert not run.exists()


def test_checkpoint_meta_without_config(finished_run, tmp_path, data_cache, capsys):
    import json
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    meta_path = next(run.glob("step_*/meta.json"))
    meta = json.loads(meta_path.read_text())
    del meta["config"]
    meta_path.write_text(json.dumps(meta))
    before = _snapshot(run)
    _fails(capsys, train(run, data_cache, "--train_steps", "3", "--resume", "latest"), "'config'")
    assert _snapshot(run) == before


def test_disk_full_exits_2_and_keeps_earlier_checkpoints(tmp_path, data_cache, capsys, monkeypatch):
    import torch

    from staged_fast.checkpoint import list_checkpoints, load_checkpoint

    real_save, saves = torch.save, []

    def fills_up(obj, f, *args, **kwargs):  # the second checkpoint meets a full disk
        if str(f).endswith("optimizer.pt"):
            saves.append(f)
            if len(saves) == 2:
                Path(f).write_bytes(b"\0" * 100)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 832 vs 726")
        return real_save(obj, f, *args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(torch, "save", fills_up)
    _fails(capsys, train(run, data_cache, "--train_steps", "6", "--save_every", "2"), "full", "bytes free",
           "--resume latest")
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    assert not list(run.glob(".tmp-*"))
    load_checkpoint(run / "step_00000002")
    assert train(run, data_cache, "--train_steps", "6", "--save_every", "2", "--resume", "latest") == 0


def test_gpu_count_worker_error_exits_with_its_code_and_no_traceback(tmp_path, data_cache):
    """--gpu_count 2 outside torchrun launches the workers itself; a user error in them (--kernels triton for a
    head_dim the flash kernel lacks, found once the model's shape is known) reaches the user as the workers'
    one-paragraph error and exit code 2, with torchrun's table of which rank failed, not as torchrun's
    ChildFailedError traceback (exit 1)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "staged_fast.train", "--gpu_count", "2", "--device", "cpu", "--size", "tiny",
           "--seqlen", "32", "--batch_size", "2", "--train_steps", "3", "--warmup_steps", "5", "--no_progress",
           "--cache_dir", data_cache, "--save_prefix", str(tmp_path / "run"), "--kernels", "triton",
           "--n_embd", "120"]  # head_dim 60; warmup past the end: a parse-time warning
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "the flash attention kernel is built for head_dim" in err, err[-3000:]
    assert "error: 2 worker processes launched with --gpu_count; rank" in err, err[-3000:]
    # said once, by the launcher: the workers parse the same flags and keep quiet about them
    assert err.count("warning: --warmup_steps 5 is longer than --train_steps 3") == 1, err[-3000:]


def test_a_full_disk_when_logging_metrics_stops_with_a_clear_error_and_the_run_continues(tmp_path, data_cache,
                                                                                          capsys, monkeypatch):
    """ENOSPC appending to metrics.jsonl mid-run, and again when a requeue cuts the log back to its checkpoint:
    each used to end in an OSError traceback (and left the cut's temporary file). Now: exit 2 naming the disk,
    the last checkpoint intact, and the same command continues once there is space."""
    import builtins
    import errno

    import staged_fast.metrics as metrics_module

    real_open, full = builtins.open, {"append": False, "rewrite": False}

    def disk_full_open(path, mode="r", *args, **kwargs):
        name = Path(path).name
        if (full["append"] and name == "metrics.jsonl" and "a" in mode) or (
                full["rewrite"] and name.startswith(".tmp-metrics.jsonl") and "w" in mode):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(metrics_module, "open", disk_full_open, raising=False)
    run = tmp_path / "run"
    assert train(run, data_cache, "--train_steps", "6", "--stop_at_step", "3", "--save_every", "3") == 0
    capsys.readouterr()
    full["append"] = True
    err = _fails(capsys, train(run, data_cache, "--train_steps", "6", "--resume", "latest"),
                 "metrics.jsonl (the disk is full)", "last complete checkpoint", "run the same command")
    assert "Traceback" not in err
    # the requeue while the disk is still full: the cut of the log back to the checkpoint fails cleanly too
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"iteration": 9, "loss": 1.0}\n')
    full.update(append=False, rewrite=True)
    _fails(capsys, train(run, data_cache, "--train_steps", "6", "--resume", "latest"), "the disk is full")
    assert not list(run.glob(".tmp-metrics*"))
    full["rewrite"] = False
    assert train(run, data_cache, "--train_steps", "6", "--resume", "latest") == 0
    assert "done: step 6" in capsys.readouterr().out
