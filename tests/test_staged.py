"""Staged training end to end: growth inside a run, offline growth of a checkpoint, plans, the slope
trigger's wiring, and growth under torchrun."""
import os
import subprocess
import sys

import pytest
import torch

from staged_fast.checkpoint import list_checkpoints, load_checkpoint, load_model
from staged_fast.lr_schedule import LRSchedule
from staged_fast.metrics import read_metrics
from train_utils import losses, train

START = ["--size", "tiny_div2_width", "--dropout", "0"]


def _records(run):
    return read_metrics(run / "metrics.jsonl")


def _growths(run):
    return [r for r in _records(run) if r.get("event") == "growth"]


def _updates(run):
    return [r for r in _records(run) if "loss" in r and "event" not in r]


def test_growth_mid_run_preserves_loss_and_restarts_schedule(tmp_path, data_cache, capsys):
    run = tmp_path / "run"
    assert train(run, data_cache, *START, "--train_steps", "8", "--grow_at", "4", "--grow_ops", "width",
                 "--restart_steps", "2", "--restart_warmup_steps", "2") == 0
    # the summary counts the updates the growth's restart adds (the run takes 10, below)
    assert "10 updates to go (the growths restart the step counter)" in capsys.readouterr().out
    (event,) = _growths(run)
    assert event["old_size"] == "2L/64d/1H" and event["new_size"] == "2L/128d/2H"
    assert event["iteration"] == 4 and event["step_before"] == 4 and event["step_after"] == 2
    assert abs(event["loss_after"] - event["loss_before"]) < 1e-5 * event["loss_before"]
    ups = _updates(run)
    assert [u["iteration"] for u in ups] == list(range(1, 11))  # 4 before, 8 - 2 after
    assert [u["step"] for u in ups] == [1, 2, 3, 4, 3, 4, 5, 6, 7, 8]
    after = {u["iteration"]: u for u in ups}
    sched = LRSchedule(base_lr=event["base_lr"], warmup_steps=5, train_steps=8)
    sched.restart(2, 2)
    assert after[5]["lr"] == 0.0  # ramp starts from 0 at R
    assert after[6]["lr"] == pytest.approx(sched(3)) and after[7]["lr"] == pytest.approx(sched.base(4))
    ck = load_checkpoint(list_checkpoints(run)[-1])
    assert ck.config.n_embd == 128 and ck.trainer_state["step"] == 8 and ck.trainer_state["iteration"] == 10


def test_offline_doubling_writes_grown_checkpoint_and_continues(tmp_path, data_cache):
    small = tmp_path / "small"
    assert train(small, data_cache, *START, "--train_steps", "4") == 0
    grown = tmp_path / "grown"
    assert train(grown, data_cache, *START, "--train_steps", "8", "--resume", str(small), "--doubling", "weights",
                 "--restart_steps", "3", "--restart_warmup_steps", "2") == 0
    first = load_checkpoint(list_checkpoints(grown)[0])
    assert first.config.n_embd == 128 and first.trainer_state["step"] == 3
    assert first.trainer_state["grown_at_iteration"] == first.trainer_state["iteration"] == 4
    # the grown checkpoint computes what the small one did, and exports to HF
    from staged_fast.hf import to_hf

    a, b = load_model(list_checkpoints(small)[-1]).eval(), load_model(first.path).eval()
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        la, lb = a(idx), b(idx)
        assert ((la - lb).abs().max() / la.abs().max()) < 1e-5
        assert ((to_hf(b).eval()(idx).logits - lb).abs().max() / lb.abs().max()) < 1e-5
    assert [u["step"] for u in _updates(grown)] == [4, 5, 6, 7, 8]


def test_seed_workflow_grow_cli_then_resume_with_restart(tmp_path, data_cache):
    small = tmp_path / "small"
    assert train(small, data_cache, *START, "--train_steps", "4") == 0
    out = tmp_path / "grown_ckpt"
    from staged_fast.grow import main as grow_main

    assert grow_main([str(list_checkpoints(small)[-1]), "--op", "width", "--out", str(out)]) == 0
    cont = tmp_path / "cont"
    assert train(cont, data_cache, "--size", "tiny", "--dropout", "0", "--train_steps", "8", "--resume", str(out),
                 "--restart_steps", "3", "--restart_warmup_steps", "2", "--reset_lr_scheduler") == 0
    ups = _updates(cont)
    assert [u["step"] for u in ups] == [4, 5, 6, 7, 8]
    assert ups[0]["lr"] == 0.0 and ups[0]["n_embd"] == 128
    ck = load_checkpoint(list_checkpoints(cont)[-1])
    assert {float(s["step"]) for s in ck.optimizer_state["state"].values()} == {8.0}  # Adam's count = R + 5


def test_an_offline_grown_checkpoint_trains_at_the_grown_models_peak_lr(tmp_path, data_cache, capsys):
    """An in-run growth moves the peak LR to the heuristic's value for the new size; a checkpoint grown by `grow`
    kept the small model's (the same 2L/256d model trained at 0.00246 one way and 0.00237 the other)."""
    from staged_fast.config import initial_lr_for
    from staged_fast.grow import main as grow_main

    small = tmp_path / "small"
    assert train(small, data_cache, *START, "--train_steps", "4") == 0
    out = tmp_path / "grown_ckpt"
    assert grow_main([str(list_checkpoints(small)[-1]), "--op", "width", "--out", str(out)]) == 0
    capsys.readouterr()
    cont = tmp_path / "cont"
    assert train(cont, data_cache, "--size", "tiny", "--dropout", "0", "--train_steps", "6", "--resume",
                 str(out)) == 0
    assert "metrics_lines" not in load_checkpoint(list_checkpoints(out)[-1]).trainer_state  # the source run's log is not --out's
    grown = load_checkpoint(list_checkpoints(cont)[-1])
    assert grown.trainer_state["schedule"]["base_lr"] == initial_lr_for(grown.config)
    assert f"-> {initial_lr_for(grown.config):.3g}: the heuristic for the grown" in capsys.readouterr().out


def test_a_growth_that_moves_the_loss_and_a_validation_cut_to_the_data_are_said(tmp_path, small_vocab, capsys):
    """Width noise near the weights' scale breaks function preservation in floating point (the split W - E, E
    cancels inexactly), and the run trained on silently; --val_batches beyond the validation data was cut
    silently too."""
    # the second growth copies layers: it changes the function by design, and is not warned about
    tokenizer, data_cache = small_vocab  # 512 tokens: the vocabulary is not the point
    start = [*START, "--tokenizer", tokenizer]
    assert train(tmp_path / "run", data_cache, *start, "--train_steps", "3", "--grow_at", "1,2", "--grow_ops",
                 "width,alternate_copy", "--width_noise", "0.5", "--val_batches", "5000") == 0
    out = capsys.readouterr().out
    assert out.count("warning: the growth moved the val-batch loss") == 1, out[-3000:]
    assert "--width_noise 0.5 is large" in out and "note: --val_batches 5000, and the validation data holds" in out
    assert train(tmp_path / "exact", data_cache, *start, "--train_steps", "2", "--grow_at", "1", "--grow_ops",
                 "width", "--width_noise", "0.001") == 0
    assert "moved the val-batch loss" not in capsys.readouterr().out


def test_plan_drives_growth(tmp_path, data_cache):
    from staged_fast.schedule import plan_for_run

    plan = plan_for_run("tiny", ["width"], train_steps=12)
    path = tmp_path / "plan.json"
    plan.to_json(str(path))
    run = tmp_path / "run"
    assert train(run, data_cache, "--dropout", "0", "--schedule", str(path)) == 0
    (event,) = _growths(run)
    (g,) = plan.growths()
    assert event["iteration"] == g["at_run_step"] and event["op"] == g["op"] == "width"
    assert event["step_after"] == g["restart_step"]
    assert event["new_size"] == "2L/128d/2H"
    assert _updates(run)[-1]["step"] == plan.to_dict()["final_schedule_step"]


def test_slope_trigger_wiring_grows_when_rule_fires(tmp_path, data_cache):
    """The trainer grows on the update after its SlopeTrigger fires (the rule itself: test_schedule.py)."""
    from staged_fast import distributed as D
    from staged_fast.train_args import parse_args
    from staged_fast.trainer import Trainer

    args = parse_args([*START, "--seqlen", "32", "--batch_size", "2", "--train_steps", "50", "--grow_when", "slope",
                       "--grow_ops", "width", "--save_prefix", str(tmp_path / "run"), "--cache_dir", data_cache,
                       "--device", "cpu", "--no_progress"])
    trainer = Trainer(args, D.DistInfo())
    assert trainer.growths.trigger is not None and args.restart_steps == "auto"
    fired_at = None
    # a synthetic curve: power law that flattens; feed it until the trigger fires
    for i, step in enumerate(range(10, 2000, 10)):
        trainer.step = step
        trainer.on_validation(10.0 * step ** -0.5 + 3.0)
        if trainer.growths.fired:
            fired_at = step
            break
    assert fired_at is not None
    trainer.maybe_grow()
    assert trainer.config.n_embd == 128 and trainer.growth_log[-1]["op"] == "width"
    assert trainer.step == round(fired_at / 1.776)
    trainer.close()


@pytest.mark.slow
def test_growth_under_torchrun_keeps_ranks_identical(tmp_path, data_cache):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "staged_fast.train", *START, "--seqlen", "32", "--batch_size", "2", "--train_steps", "6", "--grow_at", "3",
           "--grow_ops", "width", "--log_rate", "1", "--val_every", "100", "--val_batches", "1", "--no_progress",
           "--cache_dir", data_cache, "--device", "cpu", "--save_prefix", str(run)]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (event,) = _growths(run)  # the trainer checks weight+state checksums across ranks and raises if they differ
    assert abs(event["loss_after"] - event["loss_before"]) < 1e-5 * event["loss_before"]
    ups = _updates(run)
    assert len(ups) == 6 and ups[-1]["n_embd"] == 128
    # training goes on smoothly: the first loss after growth is close to the last before
    assert abs(ups[3]["loss"] - ups[2]["loss"]) < 0.5


# A requeued job repeats its command line: + --resume latest must continue a run that already grew.
ISSUE_CMD = ["--size", "tiny_div2_width", "--grow_at", "8", "--grow_ops", "width", "--restart_steps", "auto",
             "--restart_warmup_steps", "2", "--train_steps", "16"]
SMALL_BATCH = ["--seqlen", "32", "--batch_size", "2"]  # the vocab-sized logits dominate a tiny model's update


def _same_final_weights(a, b):
    ka, kb = load_checkpoint(list_checkpoints(a)[-1]), load_checkpoint(list_checkpoints(b)[-1])
    return ka.config == kb.config and all(torch.equal(ka.model_state[k], kb.model_state[k]) for k in ka.model_state)


def test_staged_run_resumes_with_its_own_command_line(tmp_path, data_cache):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(straight, data_cache, *ISSUE_CMD, *SMALL_BATCH) == 0
    assert train(split, data_cache, *ISSUE_CMD, *SMALL_BATCH, "--stop_at_step", "8") == 0
    assert load_checkpoint(list_checkpoints(split)[-1]).config.n_embd == 128  # saved after the growth
    assert train(split, data_cache, *ISSUE_CMD, *SMALL_BATCH, "--resume", "latest") == 0
    assert len(_growths(split)) == 1  # grown once, not twice
    assert losses(split) == losses(straight)  # bit for bit
    assert _same_final_weights(split, straight)


def test_planned_run_resumes_with_its_own_command_line(tmp_path, data_cache):
    from staged_fast.schedule import plan_for_run

    plan = plan_for_run("tiny", ["width"], train_steps=12)
    path = tmp_path / "plan.json"
    plan.to_json(str(path))
    (g,) = plan.growths()
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(straight, data_cache, "--schedule", str(path), *SMALL_BATCH) == 0
    assert train(split, data_cache, "--schedule", str(path), *SMALL_BATCH, "--stop_at_step", str(g["at_run_step"])) == 0
    assert train(split, data_cache, "--schedule", str(path), *SMALL_BATCH, "--resume", "latest") == 0
    assert len(_growths(split)) == 1
    assert losses(split) == losses(straight)
    assert _same_final_weights(split, straight)


def _slope_args(run, data_cache, *extra):
    from staged_fast.train_args import parse_args

    return parse_args([*START, "--seqlen", "32", "--batch_size", "2", "--train_steps", "50", "--grow_when", "slope",
                       "--grow_ops", "width", "--save_prefix", str(run), "--cache_dir", data_cache, "--device", "cpu",
                       "--no_progress", *extra])


def _fire_slope_rule(trainer):
    for step in range(10, 2000, 10):  # a power law that flattens: the rule fires on it
        trainer.step = step
        trainer.on_validation(10.0 * step ** -0.5 + 3.0)
        if trainer.growths.fired:
            return step
    raise AssertionError("the slope rule never fired")


def test_slope_run_resumes_with_its_own_command_line(tmp_path, data_cache):
    from staged_fast import distributed as D
    from staged_fast.trainer import Trainer

    run = tmp_path / "run"
    trainer = Trainer(_slope_args(run, data_cache), D.DistInfo())
    _fire_slope_rule(trainer)
    trainer.maybe_grow()
    trainer.save()
    trainer.close()
    again = Trainer(_slope_args(run, data_cache, "--resume", "latest"), D.DistInfo())
    assert again.config.n_embd == 128 and again.growths.pending is None
    assert again.growth_log == trainer.growth_log and again.step == trainer.step
    again.close()


def test_width_noise_applies_to_width_growths_only(tmp_path, data_cache):
    """A plan (or --grow_at) mixing width and depth ops with --width_noise: the noise splits width growths,
    depth growths stay exact copies/identities (it used to fail at the depth growth after a whole stage)."""
    from staged_fast import distributed as D
    from staged_fast.train_args import parse_args
    from staged_fast.trainer import Trainer

    args = parse_args([*START, "--seqlen", "32", "--batch_size", "2", "--train_steps", "50", "--grow_at", "10,20",
                       "--grow_ops", "width,alternate_id", "--width_noise", "0.01", "--save_prefix",
                       str(tmp_path / "run"), "--cache_dir", data_cache, "--device", "cpu", "--no_progress"])
    trainer = Trainer(args, D.DistInfo())
    for op in ("width", "alternate_id"):
        event = trainer.grow(op)
        assert abs(event["loss_after"] - event["loss_before"]) < 1e-4 * event["loss_before"], event
    assert trainer.config.shape_str() == "4L/128d/2H"
    blocks = trainer.model.transformer.h
    w = blocks[0].attn.c_proj.weight
    assert not torch.equal(w[:64, :64], w[64:, 64:])  # the width split is not symmetric: noise applied
    trainer.close()
