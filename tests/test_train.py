"""End-to-end training on the bundled corpus: learning, exact resume, multi-process equivalence."""
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from staged_fast.checkpoint import list_checkpoints, load_checkpoint
from staged_fast.metrics import read_metrics
from train_utils import losses, train


def test_tiny_model_learns(tmp_path, data_cache):
    assert train(tmp_path / "run", data_cache, "--train_steps", "100", "--warmup_steps", "10",
                 "--dropout", "0", "--lr", "3e-3", "--tensorboard") == 0
    curve = losses(tmp_path / "run")
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(curve) == 100
    first, last = sum(curve[:5]) / 5, sum(curve[-10:]) / 10
    assert first > 10.0  # ~ln(50257) at init
    assert last < first - 3.0, (first, last)


def test_a_cpu_checkpoint_resumed_on_cuda_reseeds_the_cuda_rng(monkeypatch):
    """A checkpoint saved on the CPU has no CUDA RNG state: resumed on a GPU, dropout must not redraw the
    masks of the run's first updates (the CUDA generator still at its start seed); it is reseeded per rank
    and update, as for a change of rank count, and the log says so. (CUDA stood in: its two calls recorded.)"""
    from types import SimpleNamespace

    from staged_fast import distributed as D
    from staged_fast.trainer import Trainer

    seeds, said = [], []
    monkeypatch.setattr(torch.cuda, "manual_seed", seeds.append)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *a: pytest.fail("the checkpoint has no CUDA state"))
    trainer = SimpleNamespace(dist=D.DistInfo(rank=1, world_size=2), device=torch.device("cuda", 1),
                              args=SimpleNamespace(seed=5), iteration=40, log=said.append)
    trainer._reseed_value = lambda: Trainer._reseed_value(trainer)
    cpu_state = torch.get_rng_state()
    ckpt = SimpleNamespace(trainer_state={"rng": [{"cpu": cpu_state, "cuda": None}] * 2})
    Trainer._restore_rng(trainer, ckpt)
    assert seeds == [5 + 7919 + 40]
    assert "no CUDA RNG state" in said[0]
    assert torch.equal(torch.get_rng_state(), cpu_state)


def test_resume_is_bit_exact(tmp_path, data_cache, capsys):
    flags = ["--train_steps", "12", "--dropout", "0.1", "--val_every", "4", "--weight_decay", "0.1"]
    assert train(tmp_path / "straight", data_cache, *flags) == 0
    assert train(tmp_path / "split", data_cache, *flags, "--stop_at_step", "5") == 0
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step_00000005"]
    said = capsys.readouterr().out
    assert (f"stopped (--stop_at_step 5) at step 5 of 12: step 5, 1,280 tokens, checkpoint "
            f"{tmp_path / 'split' / 'step_00000005'}; to continue: --resume latest --save_prefix {tmp_path / 'split'} "
            f"without --stop_at_step") in said, said[-2000:]
    assert train(tmp_path / "split", data_cache, *flags, "--resume", "latest") == 0
    assert "done: step 12, 3,072 tokens" in capsys.readouterr().out
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert len(straight) == len(split) == 12
    assert straight == split  # bit for bit, dropout and data order included
    a = load_checkpoint(list_checkpoints(tmp_path / "straight")[-1])
    b = load_checkpoint(list_checkpoints(tmp_path / "split")[-1])
    assert a.trainer_state["step"] == b.trainer_state["step"] == 12
    assert a.trainer_state["sampler"]["consumed_samples"] == b.trainer_state["sampler"]["consumed_samples"]
    for k in a.model_state:
        assert (a.model_state[k] == b.model_state[k]).all(), k


@pytest.mark.slow
def test_torchrun_two_ranks_match_single_process_with_double_accumulation(tmp_path, data_cache):
    common = ["--size", "tiny", "--seqlen", "32", "--batch_size", "2", "--warmup_steps", "2", "--log_rate", "1",
              "--train_steps", "6", "--dropout", "0", "--val_every", "3", "--val_batches", "2", "--no_progress",
              "--cache_dir", data_cache, "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "staged_fast.train", *common, "--grad_accum", "4",
                             "--save_prefix", str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "staged_fast.train", *common, "--grad_accum", "2",
                            "--save_prefix", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert abs(a - b) < 1e-6 * max(1.0, abs(a)), (one, two)
    v1 = [r["val_loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if r.get("val_loss")]
    v2 = [r["val_loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r.get("val_loss")]
    assert v1 and len(v1) == len(v2)
    ck = load_checkpoint(list_checkpoints(tmp_path / "two")[-1])
    assert ck.trainer_state["world_size"] == 2 and len(ck.trainer_state["rng"]) == 2


def test_cli_kernels_triton_on_cpu_tracks_torch(tmp_path, small_vocab):
    """`--kernels triton` from a fresh process (no TRITON_INTERPRET set) switches on the interpreter before
    anything imports Triton, and its losses track the torch path's (a 512-token vocabulary: the interpreter's
    LM-head loss over GPT-2's 50257 took most of this test's time)."""
    tokenizer, cache = small_vocab
    common = ["--size", "tiny", "--seqlen", "32", "--batch_size", "2", "--warmup_steps", "1", "--log_rate", "1",
              "--train_steps", "3", "--dropout", "0", "--val_every", "100", "--val_batches", "1", "--no_progress",
              "--tokenizer", tokenizer, "--cache_dir", cache, "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for backend in ("torch", "triton"):
        proc = subprocess.run([sys.executable, "-m", "staged_fast.train", *common, "--kernels", backend,
                               "--save_prefix", str(tmp_path / backend)], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TRITON_INTERPRET=1" in proc.stderr  # said once, not silent
    for a, b in zip(losses(tmp_path / "torch"), losses(tmp_path / "triton")):
        assert abs(a - b) < 1e-4, (losses(tmp_path / "torch"), losses(tmp_path / "triton"))


def test_the_trainer_imports_no_triton_kernel_helpers_before_it_picks_the_interpreter():
    """Importing staged_fast.kernels._common fixes whether the kernels are interpreted; the trainer's modules must
    leave it to --kernels triton's first call on CPU (an import from activation checkpointing once broke the test
    above)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys, staged_fast.train, staged_fast.trainer, staged_fast.model, staged_fast.llama, "
            "staged_fast.activation_checkpointing; print(sorted(m for m in sys.modules if m.startswith('staged_fast.kernels.')))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "staged_fast.kernels._common" not in proc.stdout and "triton" not in proc.stdout.replace("staged_fast", ""), proc.stdout


def _worker_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker process with RANK=rank (a direct child of the torchrun process)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(d.name)
    return None


@contextlib.contextmanager
def _two_ranks_training(tmp_path, data_cache, launcher: list[str], *extra: str):
    """A 2-rank CPU job started with `launcher` (the command before the trainer's arguments; `extra` after them),
    once it has logged 3 updates: yields (the job's process, its two workers' pids, the run folder). Whatever is
    still running at the end is killed (torchrun's workers run in sessions of their own)."""
    run = tmp_path / "ddp"
    cmd = [*launcher, "--size", "tiny", "--seqlen", "32", "--batch_size", "2", "--train_steps", "100000",
           "--warmup_steps", "10", "--log_rate", "1", "--val_every", "100000", "--val_batches", "1",
           "--save_every", "100000", "--no_progress", "--cache_dir", data_cache, "--device", "cpu",
           "--save_prefix", str(run), *extra]
    log = open(tmp_path / "job.log", "w")
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    workers = []
    try:
        deadline = time.monotonic() + 180
        while not ((run / "metrics.jsonl").exists() and len(read_metrics(run / "metrics.jsonl")) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.2)
        workers = [_worker_pid(proc.pid, r) for r in (0, 1)]
        assert None not in workers
        yield proc, workers, run
    finally:
        for pid in [proc.pid, *(w for w in workers if w)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        log.close()


def _one_checkpoint_of_both_ranks(run) -> None:
    (ckpt,) = list_checkpoints(run)
    state = load_checkpoint(ckpt).trainer_state
    records = read_metrics(run / "metrics.jsonl")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["iteration"] == records[-1]["iteration"] == len(records)


def _sigterm_mid_run(tmp_path, data_cache, launcher: list[str], target) -> tuple[int, str, float]:
    """SIGTERM the process target(job pid, worker pids) names in a 2-rank job (_two_ranks_training); return
    (exit code, output, seconds from the signal to the job's exit). Fails if the job does not exit within 60 s."""
    with _two_ranks_training(tmp_path, data_cache, launcher) as (proc, workers, run):
        t0 = time.monotonic()
        os.kill(target(proc.pid, workers), signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM: the job did not exit within 60 s\n" + (tmp_path / "job.log").read_text()[-3000:])
        elapsed = time.monotonic() - t0
    out = (tmp_path / "job.log").read_text()
    assert proc.returncode == 0, out[-3000:]
    _one_checkpoint_of_both_ranks(run)
    return proc.returncode, out, elapsed


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_kill_9_of_one_rank_ends_the_job_without_a_traceback_and_the_same_command_continues(tmp_path, data_cache):
    """A rank killed outright (the OOM killer, a node lost): the other rank's collective fails. It used to print
    two chained tracebacks (the cleanup's barrier failed again); now one line says what happened, the launcher
    names the rank, and the requeued command continues from the last checkpoint."""
    launcher = [sys.executable, "-m", "staged_fast.train", "--gpu_count", "2"]
    with _two_ranks_training(tmp_path, data_cache, launcher, "--save_every", "2") as (proc, workers, run):
        deadline = time.monotonic() + 60
        while not list_checkpoints(run):
            assert time.monotonic() < deadline, (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.2)
        os.kill(workers[1], signal.SIGKILL)
        assert proc.wait(timeout=60) == 137
    out = (tmp_path / "job.log").read_text()
    assert "Traceback" not in out and "During handling" not in out, out[-3000:]
    assert "error: 2 worker processes launched with --gpu_count; rank 1 failed first" in out, out[-3000:]
    saved = load_checkpoint(list_checkpoints(run)[-1]).trainer_state["iteration"]
    job = subprocess.run([*launcher, "--save_every", "2", "--size", "tiny", "--seqlen", "32", "--batch_size", "2", "--train_steps",
                          str(saved + 2), "--warmup_steps", "10", "--log_rate", "1", "--val_every", "100000",
                          "--val_batches", "1", "--no_progress", "--cache_dir", data_cache, "--device", "cpu",
                          "--save_prefix", str(run), "--resume", "latest", "--reset_lr_scheduler"],
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert job.returncode == 0 and f"done: step {saved + 2}" in job.stdout, (job.stdout + job.stderr)[-3000:]


def test_the_launcher_names_the_killed_rank_not_the_survivor_that_left_because_of_it():
    """torchrun stamps a worker killed outright when it notices it, which under CI's load came after the
    survivor's own exit (3, lost peer): the job was reported as rank 0 failing with exit 1."""
    from types import SimpleNamespace

    from staged_fast.train import LOST_PEER_EXIT, _cause

    survivor = SimpleNamespace(exitcode=LOST_PEER_EXIT, timestamp=100)
    killed = SimpleNamespace(exitcode=-9, timestamp=101)
    failures = SimpleNamespace(failures={0: survivor, 1: killed}, get_first_failure=lambda: (0, survivor))
    assert _cause(failures) == (1, killed)
    only_lost = SimpleNamespace(failures={0: survivor}, get_first_failure=lambda: (0, survivor))
    assert _cause(only_lost) == (0, survivor)  # nothing else to name: the first failure, as torchrun says
    crashed = SimpleNamespace(exitcode=1, timestamp=99)
    both = SimpleNamespace(failures={0: crashed, 1: killed}, get_first_failure=lambda: (0, crashed))
    assert _cause(both) == (0, crashed)  # two real failures: the earlier


@pytest.mark.slow
def test_kill_9_of_the_gpu_count_launcher_stops_its_workers_which_save(tmp_path, data_cache):
    """kill -9 of the --gpu_count launcher (no handler runs in it): its workers, in sessions of their own, used
    to train on as orphans holding the run folder. They get a SIGTERM when it dies, save one checkpoint, exit."""
    launcher = [sys.executable, "-m", "staged_fast.train", "--gpu_count", "2"]
    with _two_ranks_training(tmp_path, data_cache, launcher) as (proc, workers, run):
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 60
        while any(_alive(w) for w in workers):
            assert time.monotonic() < deadline, "the workers outlived their launcher by 60 s\n" + (
                tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.2)
    out = (tmp_path / "job.log").read_text()
    assert "Traceback" not in out, out[-3000:]
    _one_checkpoint_of_both_ranks(run)


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_sigterm_to_one_ddp_rank_saves_one_checkpoint_and_all_ranks_exit_zero(tmp_path, data_cache, rank):
    """A preempted rank (kill -TERM of one worker, not of torchrun): the ranks agree on stopping at one update,
    save one checkpoint and all exit 0 (it used to hang: the signalled rank saved alone)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "staged_fast.train"]
    _, out, elapsed = _sigterm_mid_run(tmp_path, data_cache, torchrun, lambda job, workers: workers[rank])
    # rank 0 prints it, and knows why the ranks stopped when the signal reached rank 1 only (the vote)
    assert f"; to continue: --resume latest --save_prefix {tmp_path / 'ddp'}" in out, out[-3000:]
    assert re.search(r"stopped \(SIGTERM\) at step \d+ of 100000: ", out), out[-3000:]
    print(f"SIGTERM to rank {rank} -> one checkpoint and exit 0 of both ranks in {elapsed:.1f} s")


@pytest.mark.slow
def test_sigterm_to_the_gpu_count_launcher_saves_and_exits_zero_without_a_traceback(tmp_path, data_cache):
    """--gpu_count 2 outside torchrun: this process is torchrun's agent. A SIGTERM to it (the job's main
    process, what a scheduler signals) reaches both workers, which save one checkpoint; the launcher used to
    end in torchrun's SignalException traceback with exit 1."""
    launcher = [sys.executable, "-m", "staged_fast.train", "--gpu_count", "2"]
    _, out, _ = _sigterm_mid_run(tmp_path, data_cache, launcher, lambda job, workers: job)
    assert "Traceback" not in out, out[-3000:]
    assert "stop requested (SIGTERM): torchrun passed it to the 2 workers" in out, out[-3000:]


def _tiny_trainer(tmp_path, data_cache, log=print, *, options=()):
    """`options` override the defaults (argparse keeps the last)."""
    from staged_fast import distributed as D
    from staged_fast.train_args import parse_args
    from staged_fast.trainer import Trainer

    args = parse_args(["--size", "tiny", "--seqlen", "32", "--batch_size", "2", "--train_steps", "8",
                       "--warmup_steps", "1", "--val_every", "100", "--val_batches", "1", "--save_every", "100",
                       "--no_progress", "--cache_dir", data_cache, "--device", "cpu",
                       "--save_prefix", str(tmp_path / "run"), *options])
    return Trainer(args, D.DistInfo(), log=log)


def test_sigterm_handled_during_the_stop_all_reduce_is_not_lost(tmp_path, data_cache, monkeypatch):
    """The SIGTERM handler can run while the ranks' stop flag is being all-reduced (the Python handler runs
    when the collective returns): the flag was set after it was read, and the loop used to write the
    reduced value back over it, so the request was lost and the job trained on. It must stop one update later."""
    from staged_fast import distributed as D
    from staged_fast.trainer import run

    trainer = _tiny_trainer(tmp_path, data_cache)
    reduced = []
    real_any_rank = D.any_rank

    def any_rank_with_signal_in_flight(flag, info):
        out = real_any_rank(flag, info)
        reduced.append((trainer.iteration, out))
        if trainer.iteration == 2:  # the handler runs after the flag was read, before the result is used
            trainer.stop_requested = True
        return out

    monkeypatch.setattr(D, "any_rank", any_rank_with_signal_in_flight)
    summary = run(trainer, progress=False)
    trainer.close()
    # iteration 0: the check before the first update; then one agreement per update
    assert reduced == [(0, False), (1, False), (2, False), (3, True)], reduced
    assert trainer.iteration == 3
    (ckpt,) = list_checkpoints(tmp_path / "run")
    assert load_checkpoint(ckpt).trainer_state["iteration"] == 3 and summary["checkpoint"] == str(ckpt)


def test_sigterm_during_validation_stops_at_once_and_the_resumed_run_validates(tmp_path, data_cache, monkeypatch,
                                                                                capsys):
    """A SIGTERM in the middle of a validation: it used to run to its end (with 2 ranks torchrun killed them
    after its 30 s, before they saved). The ranks agree before each batch, stop at once, save with the
    validation pending; the resumed run does it first, so the losses and the validation curve are the
    uninterrupted run's."""

    import staged_fast.data as data_module
    from staged_fast.train import main

    flags = ["--size", "tiny", "--seqlen", "32", "--batch_size", "2", "--train_steps", "6", "--warmup_steps", "1",
             "--log_rate", "1", "--val_every", "2", "--val_batches", "3", "--save_every", "100", "--no_progress",
             "--cache_dir", data_cache, "--device", "cpu", "--resume", "latest"]
    assert main([*flags, "--save_prefix", str(tmp_path / "straight")]) == 0
    real_val_batches, calls = data_module.val_batches, []

    def preempted_in_the_second_validation(*args, **kwargs):
        calls.append(1) if kwargs["num_batches"] == 3 else None  # a validation, not the check at the start
        for i, batch in enumerate(real_val_batches(*args, **kwargs)):
            if len(calls) == 2 and i == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's signal after the first batch
            yield batch

    monkeypatch.setattr(data_module, "val_batches", preempted_in_the_second_validation)
    split = tmp_path / "split"
    assert main([*flags, "--save_prefix", str(split)]) == 0
    assert "stopped (SIGTERM) at step 4 of 6" in capsys.readouterr().out
    (ckpt,) = list_checkpoints(split)
    state = load_checkpoint(ckpt).trainer_state
    assert state["iteration"] == 4 and state["validation_pending"] and state["last_val_loss"] is None
    monkeypatch.setattr(data_module, "val_batches", real_val_batches)
    assert main([*flags, "--save_prefix", str(split)]) == 0  # the requeue: the very same command
    assert losses(split) == losses(tmp_path / "straight")
    straight = {r["iteration"]: r["val_loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")
                if "val_loss" in r}
    split_records = read_metrics(split / "metrics.jsonl")
    (resumed,) = [r for r in split_records if r.get("event") == "validation"]
    assert resumed["iteration"] == 4 and resumed["val_loss"] == straight[4]
    assert [r["val_loss"] for r in split_records if r.get("iteration") == 6 and "loss" in r] == [straight[6]]


_PREEMPTED_AT_START = '''
import os, signal, sys
import staged_fast.trainer as trainer_module
from staged_fast.train import _exit_after_distributed_run, main

build = trainer_module.Trainer.__init__
def build_while_preempted(self, *args, **kwargs):
    if int(os.environ.get("RANK", "0")) == int(os.environ["SIGNAL_RANK"]):
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's signal while the data and the model are built
    build(self, *args, **kwargs)
trainer_module.Trainer.__init__ = build_while_preempted
code = main(sys.argv[1:])
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    _exit_after_distributed_run(code)
sys.exit(code)
'''


@pytest.mark.slow
@pytest.mark.parametrize("ranks,signalled", [(1, 0), (2, 1), (2, 0)])
def test_sigterm_during_the_start_leaves_cleanly_and_the_same_command_continues(tmp_path, data_cache, ranks, signalled):
    """Preempted before the first update (the signal lands while a rank builds its data and model): every rank
    exits 0 with nothing written, and the same command run again trains the whole run. It used to kill that
    rank (SIGTERM's default action), and torchrun reported the job as failed."""
    script = tmp_path / "preempted_at_start.py"
    script.write_text(_PREEMPTED_AT_START)
    run = tmp_path / "run"
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={ranks}"]
    cmd = [*launcher, str(script), "--size", "tiny", "--seqlen", "32", "--batch_size", "2", "--train_steps", "3",
           "--warmup_steps", "1", "--log_rate", "1", "--val_every", "100", "--val_batches", "1", "--no_progress",
           "--cache_dir", data_cache, "--device", "cpu", "--save_prefix", str(run)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    first = subprocess.run(cmd, env=dict(env, SIGNAL_RANK=str(signalled)), capture_output=True, text=True, timeout=300)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-3000:]
    assert "stop requested (SIGTERM) before the first update at step 0" in out, out[-3000:]
    assert "checkpoint none written" in out and list_checkpoints(run) == []
    assert "; the same command starts it again" in out, out[-3000:]
    assert not (run / "metrics.jsonl").exists() or read_metrics(run / "metrics.jsonl") == []
    again = subprocess.run(cmd, env=dict(env, SIGNAL_RANK="-1"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert [p.name for p in list_checkpoints(run)] == ["step_00000003"]
    assert len(losses(run)) == 3


def _sigterm_on_import_script(module: str) -> str:
    """A script that runs `python -m staged_fast.train` with its argv and sends itself SIGTERM the moment
    `module` is imported (the scheduler's signal at that point of the start), saying so on stdout."""
    return f'''
import os, runpy, signal, sys

class SigtermOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            print("test: SIGTERM sent as {module} is imported", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
        return None

assert {module!r} not in sys.modules
sys.meta_path.insert(0, SigtermOnImport())
sys.argv = ["staged_fast.train", *sys.argv[1:]]
runpy.run_module("staged_fast.train", run_name="__main__", alter_sys=True)
'''


def test_sigterm_while_the_module_imports_leaves_cleanly(tmp_path, data_cache):
    """A SIGTERM that lands before main runs, while `python -m staged_fast.train` imports torch (~2 s), is
    kept and handled as one during the start (exit 0, nothing written); it used to kill the process."""
    script = tmp_path / "preempted_while_importing.py"
    script.write_text(_sigterm_on_import_script("torch"))
    run = tmp_path / "run"
    cmd = [sys.executable, str(script), "--size", "tiny", "--seqlen", "32", "--batch_size", "2", "--train_steps", "3",
           "--warmup_steps", "1", "--val_every", "100", "--val_batches", "1", "--no_progress", "--cache_dir",
           data_cache, "--device", "cpu", "--save_prefix", str(run)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert "test: SIGTERM sent as torch is imported" in out, out[-3000:]
    assert proc.returncode == 0, (proc.returncode, out[-3000:])
    assert "stop requested (SIGTERM) before the first update at step 0" in out, out[-3000:]
    assert list_checkpoints(run) == []


def test_sigterm_while_gpu_count_launches_starts_no_worker(tmp_path, data_cache):
    """--gpu_count 2 outside torchrun launches the workers itself. A SIGTERM after main's handler is in place
    but before torchrun's agent installs its own was recorded and never read: the workers started and
    trained to the end as if no signal had come. Now the launch ends there: exit 0, no worker, nothing written."""
    script = tmp_path / "preempted_while_launching.py"
    script.write_text(_sigterm_on_import_script("torch.distributed.run"))
    run = tmp_path / "run"
    cmd = [sys.executable, str(script), "--gpu_count", "2", "--size", "tiny", "--seqlen", "32", "--batch_size", "2",
           "--train_steps", "3", "--warmup_steps", "1", "--val_every", "100", "--val_batches", "1", "--no_progress",
           "--cache_dir", data_cache, "--device", "cpu", "--save_prefix", str(run)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert "test: SIGTERM sent as torch.distributed.run is imported" in out, out[-3000:]
    assert proc.returncode == 0, (proc.returncode, out[-3000:])
    assert "before the 2 worker processes started: none launched" in out, out[-3000:]
    assert list_checkpoints(run) == [], out[-3000:]
    assert not (run / "metrics.jsonl").exists()


def test_an_update_never_reads_a_tensor_on_the_host(tmp_path, data_cache, monkeypatch):
    """On a GPU, reading a tensor's value on the host (bool, item, float, ...) waits for every kernel queued
    so far, so the host cannot queue the next update while this one runs. An update used to test the grad
    norm that way (to skip a non-finite one); now nothing in it does (CPU tensors stand in here)."""
    trainer = _tiny_trainer(tmp_path, data_cache, log=lambda *a, **k: None)
    trainer.train_step()  # first update: optimizer state created, caches filled
    reads = []
    for name in ("__bool__", "item", "__float__", "__int__", "__index__", "tolist"):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name):
            reads.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(torch.Tensor, name, spy)
    trainer.train_step()
    monkeypatch.undo()
    trainer.close()
    assert reads == [], reads


def test_a_non_finite_gradient_skips_that_update_on_the_device(tmp_path, data_cache):
    """A NaN in one update's gradients leaves weights, AdamW moments and its step count as they were (fused
    AdamW's found_inf, as GradScaler uses it); the next update trains; the next log record says one was skipped."""
    trainer = _tiny_trainer(tmp_path, data_cache)
    logged = []
    trainer.log = lambda *a, **k: logged.append(" ".join(map(str, a)))
    weight = trainer.model.lm_head.weight
    poison = {"now": False}
    handle = weight.register_hook(lambda g: g * float("nan") if poison["now"] else g)
    trainer.train_step()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    moments = {n: trainer.optimizer.state[p]["exp_avg"].clone() for n, p in trainer.model.named_parameters()}
    poison["now"] = True
    loss, grad_norm = trainer.train_step()
    assert not torch.isfinite(grad_norm)
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert torch.equal(trainer.optimizer.state[p]["exp_avg"], moments[n]), n
        assert trainer.optimizer.state[p]["step"].item() == 1, n
    assert trainer.step == 2  # the schedule moves on, as before (the update is dropped, not retried)
    poison["now"] = False
    trainer.train_step()
    assert not torch.equal(weight.detach(), before["transformer.wte.weight"])  # the head is tied to it
    assert trainer.optimizer.state[weight]["step"].item() == 2
    trainer.log_record(loss, grad_norm, trainer.rate_window())
    assert any("1 update(s) skipped for a non-finite gradient norm" in line for line in logged), logged
    handle.remove()
    trainer.close()


def test_validation_growth_and_saves_are_off_the_training_clock(tmp_path, data_cache, monkeypatch):
    """tokens_per_s is the wall rate of a log interval; train_tokens_per_s (and MFU) leave out validation,
    growth and checkpoint saves. Each is made 0.3 s slower here: the wall rate must see it, the training
    rate must not."""
    import time

    from staged_fast.trainer import Trainer, run

    trainer = _tiny_trainer(tmp_path, data_cache, log=lambda *a, **k: None, options=[
        "--val_every", "2", "--log_rate", "2", "--save_every", "4", "--grow_at", "4", "--grow_ops", "append_id"])
    slow = 0.3
    for name in ("evaluate", "grow", "save"):
        real = getattr(Trainer, name)
        monkeypatch.setattr(Trainer, name, lambda self, *a, _real=real, **k: (time.sleep(slow), _real(self, *a, **k))[1])
    run(trainer, progress=False)
    trainer.close()
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "tokens_per_s" in r]
    assert [r["iteration"] for r in records] == [2, 4, 6, 8]
    for r in records:
        tokens = 2 * trainer.tokens_per_step
        wall_s, train_s = tokens / r["tokens_per_s"], tokens / r["train_tokens_per_s"]
        # an interval runs from after one record to the next: each validates once; 5-6 also holds the
        # growth at 4 (grow and its two evaluations) and the save at 4
        off_clock = slow * (1 + 4 * (r["iteration"] == 6))
        assert wall_s - train_s >= off_clock - 0.01, (r, off_clock)
        assert train_s > 0 and train_s < wall_s - off_clock + 0.25, (r, off_clock)
    assert trainer.config.n_layer == 4  # the growth happened (tiny has 2 layers)


def test_main_gives_back_the_sigterm_handler_it_found(tmp_path):
    """main installs its preemption handler first thing; a caller running it in-process (a test, a notebook)
    gets its own handler back, also after a refused start."""
    import signal

    from staged_fast.train import main

    def callers_handler(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, callers_handler)
    try:
        code = main(["--size", "tiny", "--train_steps", "0", "--device", "cpu", "--save_prefix", str(tmp_path / "r")])
        assert code == 2
        assert signal.getsignal(signal.SIGTERM) is callers_handler
    finally:
        signal.signal(signal.SIGTERM, before)


def test_deterministic_in_a_process_that_used_cuda_warns_about_the_cublas_setting(monkeypatch):
    """torch reads CUBLAS_WORKSPACE_CONFIG once, at the first cuBLAS matmul: --deterministic set in a process
    that has used the GPU already (main called from a notebook) may come too late, and says so."""
    from staged_fast.train import Determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    determinism = Determinism()
    with pytest.warns(UserWarning, match="CUBLAS_WORKSPACE_CONFIG=:4096:8 before starting Python"):
        determinism.enable()
    determinism.restore()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and not torch.are_deterministic_algorithms_enabled()


def test_resume_with_fp16_from_a_run_saved_without_it(tmp_path, data_cache):
    """A checkpoint written without --fp16 holds the disabled GradScaler's empty state; resuming it with --fp16
    loaded that {} into an enabled scaler, which raised (a traceback, exit 1). The scaler now starts afresh."""
    run = tmp_path / "run"
    flags = ["--train_steps", "4", "--seqlen", "32", "--batch_size", "2"]
    assert train(run, data_cache, *flags, "--stop_at_step", "2") == 0
    assert train(run, data_cache, *flags, "--fp16", "--resume", "latest") == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_the_stop_agreement_of_a_group_of_one_reads_nothing_from_the_device(monkeypatch):
    """--parallel fsdp on one GPU runs a one-rank nccl group; agreeing on the stop flag there needs no
    all-reduce, whose result read on the host made every update wait for the GPU."""
    from staged_fast import distributed as D

    monkeypatch.setattr(D.dist, "all_reduce", lambda *a, **k: pytest.fail("an all-reduce in a group of one"))
    one = D.DistInfo(world_size=1, backend="nccl")
    assert one.enabled
    assert D.any_rank(True, one) is True and D.any_rank(False, one) is False


_STOP_VOTE_RANK = '''
import sys, torch, torch.distributed as dist
from staged_fast import distributed as D
rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
vote = D.StopVote(D.DistInfo(rank, rank, 2, torch.device("cpu"), "gloo"))
print([vote(rank == 1 and i >= 2) for i in range(5)])  # rank 1 is signalled during update 2
dist.destroy_process_group()
'''


def test_two_ranks_agree_on_the_stop_one_update_after_the_request(tmp_path):
    """The stop vote of a multi-rank run is read one update late (so that no update waits for the GPU): a
    request on one rank during update 2 stops both ranks at update 3, never one rank alone."""
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", _STOP_VOTE_RANK, str(r), str(store)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o.strip().splitlines()[-1] for o in outs] == ["[False, False, False, True, True]"] * 2, outs


def test_the_stop_vote_on_a_gpu_waits_for_the_previous_update_only(monkeypatch):
    """Under nccl the vote's result reaches the host through pinned memory and an event recorded behind it;
    each update waits for the previous update's event (the GPU meanwhile runs the update just queued), never
    for the device as a whole, and reads the previous result before the new vote's copy can overwrite it.
    CUDA's events and the collective are stand-ins here: this checks the order of the steps."""
    from staged_fast import distributed as D

    steps = []

    class Event:
        count = 0

        def __init__(self):
            Event.count += 1
            self.id = Event.count

        def record(self):
            steps.append(("record", self.id))

        def synchronize(self):
            steps.append(("wait", self.id))

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: pytest.fail("a wait for the whole device"))
    monkeypatch.setattr(D.dist, "all_reduce", lambda t, op: steps.append(("all_reduce", int(t))))
    vote = D.StopVote(D.DistInfo(world_size=2, backend="nccl"))
    vote.host = torch.full((1,), -1, dtype=torch.int32)  # what pinned host memory is on a CUDA device
    assert [vote(flag) for flag in (False, True, False, False)] == [False, False, True, False]
    assert steps == [("all_reduce", 0), ("record", 1),
                     ("wait", 1), ("all_reduce", 1), ("record", 2),
                     ("wait", 2), ("all_reduce", 0), ("record", 3),
                     ("wait", 3), ("all_reduce", 0), ("record", 4)]


def test_a_single_process_on_cuda_makes_its_device_the_current_one(monkeypatch):
    """Triton launches on the current CUDA device; a single process (no torchrun) left it unset. (CUDA is
    stood in.)"""
    from staged_fast import distributed as D

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    info = D.init("cuda", "ddp")
    assert not info.enabled and info.device == torch.device("cuda", 0) and current == [info.device]


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", 121e12), ("NVIDIA GeForce GTX 1080", None),
])
def test_mfu_peak_of_each_card_by_its_name(monkeypatch, name, peak):
    """The trainer's and bench_train's one table of dense bf16 peaks: the PCIe and NVL parts have their own
    (they matched "H100"/"H200" and got the SXM peak, understating MFU); unknown cards report no MFU."""
    from staged_fast.metrics import device_peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_flops(torch.device("cuda", 0)) == peak
    assert device_peak_flops(torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned-memory and event path needs a GPU")
def test_the_stop_vote_reads_its_result_through_pinned_memory_on_a_gpu(monkeypatch):
    """The real CUDA path of the lagged stop vote (the collective is a no-op here: one process)."""
    from staged_fast import distributed as D

    monkeypatch.setattr(D.dist, "all_reduce", lambda t, op: None)
    vote = D.StopVote(D.DistInfo(world_size=2, backend="nccl", device=torch.device("cuda", 0)))
    assert vote.host.is_pinned() and vote.flag.is_cuda
    assert [vote(flag) for flag in (False, True, False, False)] == [False, False, True, False]


def test_the_rate_window_waits_for_the_device_around_off_clock_work():
    """On a GPU the updates are queued: the window waits for the device before off-clock work (the queued
    updates are training) and after it, and before reading its rates; never per update."""
    import time

    from staged_fast.metrics import RateWindow

    events = []
    window = RateWindow(100, sync=lambda: events.append("sync"))
    events.append("update")
    with window.paused():
        events.append("validate")
        time.sleep(0.05)
    events.append("update")
    wall, train = window.rates(300)
    assert events == ["update", "sync", "validate", "sync", "update", "sync"]
    assert 200 / wall >= 200 / train + 0.05 - 1e-3
    window.restart(300)
    assert window.paused_s == 0 and window.tokens == 300
