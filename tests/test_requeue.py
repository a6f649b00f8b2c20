"""What a requeue finds in its run folder: a finished run, an older checkpoint resumed in place, a step a killed
re-save had moved aside, a validation cut short at a growth. Each ends in a clean continuation or a refusal."""
import os
import signal

from staged_fast.checkpoint import list_checkpoints, load_checkpoint
from staged_fast.metrics import read_metrics
from staged_fast.train import main
from train_utils import losses, train


def _vocab512(small_vocab) -> tuple[str, ...]:
    """train()'s cache and a 512-token tokenizer: what a requeue finds does not depend on the vocabulary, and the
    LM head of GPT-2's 50257 dominates these runs."""
    tokenizer, cache = small_vocab
    return cache, "--tokenizer", tokenizer


def test_the_requeue_of_a_finished_run_writes_nothing(tmp_path, small_vocab, capsys):
    """It used to save its last step again: a kill between that re-save's two renames lost the run."""
    run = tmp_path / "run"
    assert train(run, *_vocab512(small_vocab), "--train_steps", "3", "--resume", "latest") == 0
    (final,) = list_checkpoints(run)
    inode, metrics = final.stat().st_ino, (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert train(run, *_vocab512(small_vocab), "--train_steps", "3", "--resume", "latest") == 0
    assert f"done: step 3, 768 tokens, checkpoint {final}" in capsys.readouterr().out
    assert [p.stat().st_ino for p in list_checkpoints(run)] == [inode]
    assert (run / "metrics.jsonl").read_text() == metrics
    assert load_checkpoint(final).trainer_state["metrics_lines"] == len(metrics.splitlines())


def test_a_requeue_cuts_the_log_at_the_checkpoints_own_line_count(tmp_path, small_vocab):
    """What a killed attempt logged after the checkpoint goes, even a record of the checkpoint's own update
    (cut by update alone, a growth or validation record logged after that update's save stayed)."""
    run = tmp_path / "run"
    assert train(run, *_vocab512(small_vocab), "--train_steps", "3", "--stop_at_step", "2") == 0
    kept = (run / "metrics.jsonl").read_text()
    with open(run / "metrics.jsonl", "a") as f:  # the killed attempt's lines: update 2's, then update 3's
        f.write('{"event": "growth", "iteration": 2}\n{"iteration": 3, "loss": 1.0}\n')
    assert train(run, *_vocab512(small_vocab), "--train_steps", "3", "--resume", "latest") == 0
    lines = (run / "metrics.jsonl").read_text()
    assert lines.startswith(kept) and '"event": "growth"' not in lines
    assert [r["iteration"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3]


def test_an_older_checkpoint_of_the_folder_is_continued_only_with_overwrite(tmp_path, small_vocab, capsys):
    """Continued in place, it left the newer checkpoints listed: a later --resume latest took them, beside the
    new run's metrics. Refused; --overwrite deletes the newer ones, and the run goes on from the older."""
    run = tmp_path / "run"
    flags = ["--train_steps", "6", "--save_every", "2"]
    assert train(run, *_vocab512(small_vocab), *flags) == 0
    older = run / "step_00000002"
    capsys.readouterr()
    assert train(run, *_vocab512(small_vocab), *flags, "--resume", str(older)) == 2
    err = capsys.readouterr().err
    assert "is an older checkpoint of" in err and "step_00000004, step_00000006" in err and "--overwrite" in err
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000004", "step_00000006"]
    assert train(run, *_vocab512(small_vocab), *flags, "--resume", str(older), "--overwrite", "--stop_at_step", "3") == 0
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000003"]
    assert [r["iteration"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3]
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


def test_a_step_a_killed_resave_moved_aside_is_restored_and_continued(tmp_path, small_vocab, capsys):
    """Where a re-save cannot swap atomically it moves the old step aside first; killed right then, the leftover
    clean-up deleted the run's last checkpoint and the same command started afresh from step 0."""
    run = tmp_path / "run"
    assert train(run, *_vocab512(small_vocab), "--train_steps", "4", "--stop_at_step", "2") == 0
    (step,) = list_checkpoints(run)
    step.rename(run / f".tmp-old-{step.name}-4242")  # what the kill left: the old copy aside, the new one unnamed
    (run / ".tmp-step_00000002-4242").mkdir()
    capsys.readouterr()  # the flags left out are the moved-aside step's (it was the only one: a fresh start before)
    assert main(["--resume", "latest", "--save_prefix", str(run), "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "restored checkpoint step_00000002" in out and f"resuming from {step}" in out, out[-2000:]
    assert "--train_steps 4" in out and "done: step 4" in out, out[-2000:]
    assert [r["iteration"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


def test_a_validation_cut_short_at_a_growth_is_logged_once_across_preempted_resumes(tmp_path, small_vocab,
                                                                                    monkeypatch, capsys):
    """SIGTERM inside the validation of the growth's update, then again while the resumed run grows: the
    validation and the growth are done (and logged) once, and saved before the run leaves, not redone and logged
    again by the next start; the losses are the uninterrupted run's."""
    import staged_fast.data as data_module
    import staged_fast.trainer as trainer_module

    flags = ["--size", "tiny_div2_width", "--seqlen", "32", "--batch_size", "2", "--train_steps", "8",
             "--warmup_steps", "1", "--log_rate", "1", "--val_every", "2", "--val_batches", "3", "--save_every",
             "100", "--no_progress", "--cache_dir", small_vocab[1], "--tokenizer", small_vocab[0], "--device", "cpu",
             "--resume", "latest",
             "--grow_at", "4", "--grow_ops", "width"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*flags, "--save_prefix", str(straight)]) == 0
    real_val_batches, calls = data_module.val_batches, []

    def preempted_in_the_second_validation(*args, **kwargs):
        calls.append(1) if kwargs["num_batches"] == 3 else None
        for i, batch in enumerate(real_val_batches(*args, **kwargs)):
            if len(calls) == 2 and i == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch
    monkeypatch.setattr(data_module, "val_batches", preempted_in_the_second_validation)
    assert main([*flags, "--save_prefix", str(split)]) == 0
    assert load_checkpoint(list_checkpoints(split)[-1]).trainer_state["validation_pending"]
    calls[:] = [1]  # the resumed validation is cut short again: it names the checkpoint the same command continues
    capsys.readouterr()
    assert main([*flags, "--save_prefix", str(split)]) == 0
    said = capsys.readouterr().out
    assert f"checkpoint {list_checkpoints(split)[-1]}; the same command continues" in said, said[-1500:]
    monkeypatch.setattr(data_module, "val_batches", real_val_batches)
    assert load_checkpoint(list_checkpoints(split)[-1]).trainer_state["validation_pending"]

    real_grow = trainer_module.Trainer.grow

    def grow_preempted(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_grow(self, *args, **kwargs)
    monkeypatch.setattr(trainer_module.Trainer, "grow", grow_preempted)
    capsys.readouterr()
    assert main([*flags, "--save_prefix", str(split)]) == 0
    assert "the same command continues" in capsys.readouterr().out
    state = load_checkpoint(list_checkpoints(split)[-1]).trainer_state
    assert not state["validation_pending"] and [g["op"] for g in state["growth_log"]] == ["width"]
    monkeypatch.setattr(trainer_module.Trainer, "grow", real_grow)
    assert main([*flags, "--save_prefix", str(split)]) == 0

    def events(run):
        return [(r["event"], r["iteration"]) for r in read_metrics(run / "metrics.jsonl") if "event" in r]
    assert events(straight) == [("growth", 4)]
    assert events(split) == [("validation", 4), ("growth", 4)]  # the resumed validation has its own record
    assert losses(split) == losses(straight)


_TWO_RANKS_OVERWRITE = r'''
import datetime, sys, time, types
from pathlib import Path
import torch.distributed as dist
import torch.multiprocessing as mp

def worker(rank, store, cases):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    from staged_fast import distributed as D
    from staged_fast.trainer import Trainer
    for run, resumed in cases:  # (folder, the checkpoint continued there or "" for a whole run replaced)
        trainer = Trainer.__new__(Trainer)  # only what _check_run_dir reads
        trainer.dist = D.DistInfo(rank=rank, world_size=2, backend="gloo")
        trainer.run_dir, trainer.args, trainer.log = Path(run), types.SimpleNamespace(overwrite=True), print
        trainer.last_saved_iteration = trainer.last_saved_path = None
        trainer.resume_path = Path(run) / resumed if resumed else None
        ckpt = types.SimpleNamespace(trainer_state={"iteration": 1}) if resumed else None
        if rank == 1:
            time.sleep(1.0)  # its checkpoint loaded slower: rank 0 has already deleted what it would list
        trainer._check_run_dir(ckpt)
        box = [rank]
        dist.broadcast_object_list(box, src=0)  # the start's next collective meets the same one on rank 0
        print(f"rank {rank} through {Path(run).name}", flush=True)
    dist.destroy_process_group()

if __name__ == "__main__":
    args = sys.argv[1:]
    mp.spawn(worker, args=(args[0], list(zip(args[1::2], args[2::2]))), nprocs=2, join=True)
'''


def test_two_ranks_agree_on_what_overwrite_deletes(tmp_path):
    """Each rank listed the folder itself: one that listed after rank 0 had deleted found nothing to do and
    skipped the barrier, and its next collective met rank 0's barrier (a hang under NCCL). Rank 0's listing now
    decides on every rank: an older checkpoint continued with --overwrite, and a whole run replaced."""
    import subprocess
    import sys
    from pathlib import Path

    from staged_fast.checkpoint import save_checkpoint
    from staged_fast.config import GPTConfig
    from staged_fast.model import GPT

    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS_OVERWRITE)
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=64))
    cases = [(tmp_path / "older", "step_00000001"), (tmp_path / "whole", "")]
    for run, _ in cases:
        for step in (1, 2, 3):
            save_checkpoint(run, step=step, model=model, config=model.config, trainer_state={"iteration": step})
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "store"),
                           *[str(x) for case in cases for x in case]],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    said = done.stdout + done.stderr
    assert done.returncode == 0 and all(f"rank {r} through {run.name}" in said for r in (0, 1) for run, _ in cases), \
        said[-3000:]
    assert [p.name for p in list_checkpoints(tmp_path / "older")] == ["step_00000001"]
    assert list_checkpoints(tmp_path / "whole") == []
