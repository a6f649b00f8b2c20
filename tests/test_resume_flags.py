"""A continued run (--resume of a checkpoint in its own --save_prefix) takes the flags its command leaves out
from the checkpoint, and refuses a changed LR-schedule flag unless --reset_lr_scheduler rebuilds the schedule."""
import pytest
import torch

from staged_fast.metrics import read_metrics
from staged_fast.train import main
from staged_fast.train_args import (
    KEPT_ON_CONTINUE, SCHEDULE_FLAGS, UsageError, build_parser, continue_with_saved_flags, given_flags, parse_args,
)
from train_utils import losses

# What the run below starts with: every value differs from the flag's default.
STARTED = {"seqlen": 32, "batch_size": 2, "train_steps": 6, "warmup_steps": 1, "dropout": 0.0, "val_every": 3,
           "val_batches": 1, "log_rate": 1, "save_every": 100, "lr_decay": "cosine", "weight_decay": 0.1,
           "fp16": True, "grow_at": "4", "grow_ops": "width"}


def _fake_run(folder, step=3, **args):
    """A run folder whose newest checkpoint holds `args`: what the flags' parsing reads (trainer.pt, meta.json)."""
    ckpt = folder / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text("{}")
    torch.save({"step": step, "args": dict(vars(build_parser().parse_args([])), **args)}, ckpt / "trainer.pt")
    return ckpt


def test_flags_left_out_are_the_checkpoints_and_given_ones_stay(tmp_path, capsys):
    run = tmp_path / "run"
    _fake_run(run, **STARTED)
    args = parse_args(["--resume", "latest", "--save_prefix", str(run), "--batch_size", "3", "--device", "cpu"])
    for name, value in STARTED.items():
        assert getattr(args, name) == (3 if name == "batch_size" else value), name
    assert args.device == "cpu"
    said = capsys.readouterr().out
    assert "--seqlen 32; " in said and "--fp16" in said and "--batch_size" not in said


def test_a_flag_of_a_group_given_holds_back_the_others(tmp_path):
    """--bf16 given: the checkpoint's --fp16 would make them clash; --schedule given: its --grow_at stays out."""
    run = tmp_path / "run"
    _fake_run(run, **STARTED)
    plan = tmp_path / "plan.json"
    given = ["--bf16", "--schedule", str(plan)]
    args = build_parser().parse_args(["--resume", "latest", "--save_prefix", str(run), *given])
    assert continue_with_saved_flags(args, given_flags(given))[1] is None  # a continuation, not a branch
    assert args.bf16 and not args.fp16 and args.grow_at is None and args.grow_ops == "width"
    assert args.seqlen == 32


@pytest.mark.parametrize("flag, value", [("--train_steps", "10"), ("--lr", "0.01"), ("--lr_decay", "linear")])
def test_a_changed_schedule_flag_is_refused_unless_the_schedule_is_rebuilt(tmp_path, flag, value):
    run = tmp_path / "run"
    _fake_run(run, **STARTED)
    base = ["--resume", "latest", "--save_prefix", str(run)]
    with pytest.raises(UsageError, match=f"this command asks for {flag} {value}.*Add --reset_lr_scheduler"):
        parse_args([*base, flag, value])
    assert str(getattr(parse_args([*base, flag, value, "--reset_lr_scheduler"]), flag[2:])) == value
    assert parse_args([*base, "--train_steps", "6"]).train_steps == 6  # the same value: no change


def test_a_checkpoint_of_another_folder_or_a_doubling_takes_only_its_data_order(tmp_path, capsys):
    """A new run started from another run's checkpoint, or the seed's --doubling, is defined by its command, but
    for the flags of the data order it goes on with (the sampler refused the defaults' corpus and seed)."""
    ckpt = _fake_run(tmp_path / "old", **STARTED, seed=7, data=["corpus.txt"])
    defaults = build_parser().parse_args([])
    for argv in (["--resume", str(ckpt), "--save_prefix", str(tmp_path / "new")],
                 ["--resume", str(ckpt), "--save_prefix", str(tmp_path / "grown"), "--doubling", "weights"]):
        args = parse_args(argv)
        assert (args.seqlen, args.seed, args.data) == (32, 7, ["corpus.txt"]), argv
        assert (args.train_steps, args.batch_size, args.fp16) == (defaults.train_steps, defaults.batch_size, False)
        said = capsys.readouterr().out
        assert f"note: starting from {ckpt} with its data order's flags" in said and "--seed 7" in said, said
    given = parse_args(["--resume", str(ckpt), "--save_prefix", str(tmp_path / "new"), "--seed", "8"])
    assert (given.seed, given.seqlen) == (8, 32)


def test_resume_of_a_runs_newest_checkpoint_without_save_prefix_continues_in_its_folder(tmp_path):
    """`--resume RUN` alone continues RUN (its flags included); it used to start a timestamped folder with the
    defaults. An older checkpoint, or --doubling, still starts a new folder: nothing of RUN is overwritten."""
    run = tmp_path / "run"
    _fake_run(run, step=3, **STARTED)
    newest = _fake_run(run, step=5, **STARTED)
    for resume in (run, newest):
        args = parse_args(["--resume", str(resume)])
        assert args.save_prefix == str(run) and args.seqlen == STARTED["seqlen"], resume
    assert parse_args(["--resume", str(run / "step_00000003")]).save_prefix is None
    assert parse_args(["--resume", str(run), "--doubling", "weights"]).save_prefix is None


def test_given_flags_reads_the_command_as_argparse_does():
    assert given_flags(["--train_step", "5", "--seqlen=64", "--bf16", "--data", "a", "b"]) == {
        "train_steps", "seqlen", "bf16", "data"}
    assert set(SCHEDULE_FLAGS) <= set(KEPT_ON_CONTINUE)


def test_resume_with_only_the_folder_continues_bit_for_bit(tmp_path, data_cache, capsys):
    """The README's `--resume latest --save_prefix DIR`: the losses equal an uninterrupted run's, and the LR
    follows the run's own schedule (it used to run on to --train_steps' default 250000 on the default corpus
    and batch, past the schedule's end at LR 0)."""
    flags = ["--size", "tiny", "--seqlen", "32", "--batch_size", "2", "--train_steps", "6", "--warmup_steps", "1",
             "--dropout", "0.1", "--log_rate", "1", "--val_every", "1000", "--save_every", "1000", "--no_progress",
             "--device", "cpu", "--cache_dir", data_cache]
    assert main([*flags, "--save_prefix", str(tmp_path / "straight")]) == 0
    assert main([*flags, "--save_prefix", str(tmp_path / "split"), "--stop_at_step", "3"]) == 0
    capsys.readouterr()
    assert main(["--resume", "latest", "--save_prefix", str(tmp_path / "split"), "--no_progress"]) == 0
    said = capsys.readouterr().out
    assert "note: continuing the run in" in said and "--train_steps 6" in said, said[-2000:]
    assert "done: step 6, 384 tokens" in said, said[-2000:]
    # the run's summary before its first update, with the flags it continued with
    assert "model: gpt2 2L/128d/2H, 7.0M parameters (393.2k in the blocks), vocab 50257, dropout 0.1; torch " \
           "kernels, fp32 on cpu, 1 process" in said, said[-2000:]
    assert "64 tokens per update = 2 x 32 x 1 accumulated x 1 ranks; 3 updates to go = 192 tokens" in said
    assert "schedule: resumed at step 3 to 6, peak LR 0.00246, warmup 1, linear decay to 0" in said
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    lrs = [r["lr"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if "lr" in r]
    assert len(lrs) == 6 and all(lr > 0 for lr in lrs)
    # a new run from this checkpoint (another folder) is defined by its command: a --train_steps past the end of
    # the checkpoint's schedule is trained at its final LR, and said so
    assert main([*flags, "--resume", str(tmp_path / "split"), "--save_prefix", str(tmp_path / "branch"),
                 "--train_steps", "8", "--stop_at_step", "7"]) == 0
    said = capsys.readouterr().out
    assert "ends at step 6, and --train_steps is 8: the updates past step 6 run at its final LR (0)" in said, said
    assert "note: continuing" not in said
    # a branch whose command gives only the folders: it takes the data order's flags (the default --seed and
    # corpus were refused by the sampler), and the rest from the command
    bare = ["--resume", str(tmp_path / "split"), "--no_progress", "--train_steps", "7", "--reset_lr_scheduler",
            "--size", "tiny", "--batch_size", "2", "--warmup_steps", "1", "--device", "cpu"]
    assert main([*bare, "--save_prefix", str(tmp_path / "bare")]) == 0
    said = capsys.readouterr().out
    assert "with its data order's flags" in said and "--seqlen 32" in said, said[-2000:]
    assert "done: step 7, 448 tokens" in said, said[-2000:]
    # another seed: refused, naming --reset_data_order, which starts a new order
    assert main([*bare, "--save_prefix", str(tmp_path / "seed"), "--seed", "5"]) == 2
    assert "add --reset_data_order to start a new data order" in capsys.readouterr().err
    assert main([*bare, "--save_prefix", str(tmp_path / "seed"), "--seed", "5", "--reset_data_order"]) == 0
    assert "--reset_data_order: a new data order from the start of the data (seed 5)" in capsys.readouterr().out


def test_local_paths_are_recorded_absolute_and_hub_names_as_given(tmp_path, monkeypatch):
    """A continued run takes --data and --tokenizer from the checkpoint: relative ones, requeued from another
    working directory, read another folder of that name or were taken for hub names."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "tok").mkdir()
    monkeypatch.chdir(tmp_path)
    args = parse_args(["--data", "corpus", "wikitext:wikitext-2-raw-v1", "--tokenizer", "tok",
                       "--cache_dir", "cache", "--size", "tiny"])
    assert args.data == [str(tmp_path / "corpus"), "wikitext:wikitext-2-raw-v1"]
    assert (args.tokenizer, args.cache_dir) == (str(tmp_path / "tok"), str(tmp_path / "cache"))
    assert parse_args(["--size", "tiny"]).tokenizer == "gpt2"


def test_doubling_of_the_runs_own_checkpoint_is_refused(tmp_path):
    """The README's requeue of a doubled run (the same command with --resume latest) grew it a second time."""
    run = tmp_path / "grown"
    _fake_run(run, **STARTED)
    with pytest.raises(UsageError, match="a checkpoint of this run .* itself.*drop --doubling"):
        parse_args(["--resume", "latest", "--save_prefix", str(run), "--doubling", "layers"])


def test_a_train_steps_that_contradicts_the_plan_is_refused(tmp_path):
    from staged_fast.schedule import plan_for_run

    path = tmp_path / "plan.json"
    plan_for_run("tiny", ["width"], train_steps=12).to_json(str(path))
    final = plan_for_run("tiny", ["width"], train_steps=12).to_dict()["final_schedule_step"]
    with pytest.raises(UsageError, match=rf"--train_steps 20 contradicts --schedule .* takes 12 updates \(its step "
                                         rf"counter ends at {final}"):
        parse_args(["--schedule", str(path), "--train_steps", "20"])
    assert parse_args(["--schedule", str(path), "--train_steps", str(final)]).schedule == str(path)


def test_flags_that_do_nothing_are_warned_about(capsys):
    parse_args(["--size", "tiny", "--restart_warmup_steps", "2", "--decay_fraction", "0.5"])
    parse_args(["--size", "tiny_div2_depth", "--grow_at", "2", "--grow_ops", "append_id", "--width_noise", "0.01",
                "--train_steps", "4"])
    err = capsys.readouterr().err
    assert "--restart_warmup_steps 2 ramps the LR after a growth" in err
    assert "--decay_fraction 0.5 is the share of the run --lr_decay wsd decays over" in err
    assert "--width_noise 0.01 splits width growths, and this run's growths are append_id" in err


def test_a_doubled_run_with_restart_steps_continues_and_restarts_once(tmp_path, small_vocab, capsys, monkeypatch):
    """`--resume latest --save_prefix DIR` continues a --doubling --restart_steps run, as its finish line says: the
    flag it takes from the checkpoint restarts nothing (it was refused: 'Drop --restart_steps', which the command
    did not give). Preempted as it grew, the resume does not restart the counter a second time (10 -> 6 -> 3)."""
    import os
    import shutil
    import signal

    import staged_fast.trainer as trainer_mod
    from staged_fast.checkpoint import list_checkpoints, load_checkpoint

    flags = ["--seqlen", "32", "--batch_size", "2", "--train_steps", "20", "--warmup_steps", "3", "--log_rate", "1",
             "--val_every", "1000", "--val_batches", "2", "--no_progress", "--save_every", "1000", "--device", "cpu",
             "--tokenizer", small_vocab[0], "--cache_dir", small_vocab[1]]  # 512 tokens: the vocabulary is not the point
    small, trained, preempted = tmp_path / "small", tmp_path / "trained", tmp_path / "preempted"
    assert main([*flags, "--size", "tiny_div2_width", "--save_prefix", str(small), "--stop_at_step", "10"]) == 0
    doubling = [*flags, "--resume", str(small), "--doubling", "weights", "--restart_steps", "auto"]
    # --stop_at_step counts updates (iterations): 10 -> step 6 at the growth, then 2 updates
    assert main([*doubling, "--save_prefix", str(trained), "--stop_at_step", "12"]) == 0
    capsys.readouterr()
    assert main(["--resume", "latest", "--save_prefix", str(trained), "--no_progress", "--stop_at_step", "13"]) == 0
    said = capsys.readouterr().out
    assert "stopped (--stop_at_step 13) at step 9 of 20" in said, said[-1500:]

    real_grow = trainer_mod.Trainer.grow

    def grow_preempted(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's signal arrives during the growth
        return real_grow(self, *args, **kwargs)
    monkeypatch.setattr(trainer_mod.Trainer, "grow", grow_preempted)
    assert main([*doubling, "--save_prefix", str(preempted)]) == 0
    monkeypatch.setattr(trainer_mod.Trainer, "grow", real_grow)
    assert load_checkpoint(list_checkpoints(preempted)[-1]).trainer_state["step"] == 6
    typed = tmp_path / "typed"
    shutil.copytree(preempted, typed)
    assert main(["--resume", "latest", "--save_prefix", str(preempted), "--no_progress", "--stop_at_step", "11"]) == 0
    assert load_checkpoint(list_checkpoints(preempted)[-1]).trainer_state["step"] == 7
    capsys.readouterr()  # the flag typed on that resume: not applied a second time either, and said so
    assert main(["--resume", "latest", "--save_prefix", str(typed), "--no_progress", "--stop_at_step", "11",
                 "--restart_steps", "auto"]) == 0
    assert "already restarted the step counter (now 6)" in capsys.readouterr().out
    assert load_checkpoint(list_checkpoints(typed)[-1]).trainer_state["step"] == 7
    capsys.readouterr()  # typed on a resume after updates since the growth: refused, as before
    assert main(["--resume", "latest", "--save_prefix", str(preempted), "--no_progress", "--stop_at_step", "12",
                 "--restart_steps", "auto"]) == 2
    assert "was not just grown" in capsys.readouterr().err
