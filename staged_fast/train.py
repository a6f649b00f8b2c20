"""`python -m staged_fast.train`: parse, build, train, close.

Single process, or under `torchrun` (env://) with DDP on gloo (CPU) / nccl (CUDA). With no arguments it
runs a short staged demo on the bundled corpus (see train_args.DEMO_ARGV). Rank 0 holds the run folder's lock
for the whole run (run_folder.RunLock): a second run on the same --save_prefix stops with exit code 2.
"""
from __future__ import annotations

import signal

_SIGTERM_WHILE_IMPORTING: list[int] = []


def _sigterm_while_importing(signum, frame):
    _SIGTERM_WHILE_IMPORTING.append(signum)


if __name__ == "__main__":  # `python -m staged_fast.train`: a SIGTERM during the imports below (torch takes ~2 s)
    signal.signal(signal.SIGTERM, _sigterm_while_importing)  # is kept for main's Preemption, not fatal

import contextlib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from . import distributed as D  # noqa: E402
from .checkpoint import CheckpointError, restore_moved_aside  # noqa: E402
from .config import ConfigError  # noqa: E402
from .run_folder import RunFolderError, RunLock, remove_leftovers  # noqa: E402
from .train_args import FLAGS_REPORTED_ENV, UsageError, demo_argv, parse_args  # noqa: E402

# Errors that are the user's to fix: one paragraph, exit code 2, no traceback.
USER_ERRORS = (ConfigError, CheckpointError, UsageError, RunFolderError)


def _user_errors():
    errors = list(USER_ERRORS)
    try:
        from .data import DataError

        errors.append(DataError)
    except ImportError:
        pass
    try:
        from .growth import GrowthError

        errors.append(GrowthError)
    except ImportError:
        pass
    return tuple(errors)


def _relaunch_for_gpu_count(args, argv: list[str], preemption: "Preemption") -> int | None:
    """The seed's --gpu_count N: outside torchrun, run N processes with torch.distributed.run; returns the
    job's exit code, or None when this process is to train itself. No traceback of torchrun's reaches the
    user: a SIGTERM before its agent takes the signal over starts no worker (exit 0, nothing written); one
    after is passed on to the workers, which save and stop (exit 0); a failed worker gives torchrun's
    summary of the failure and that worker's exit code."""
    if args.gpu_count in (None, 1) or "WORLD_SIZE" in os.environ:
        return None
    n = torch.cuda.device_count() if args.gpu_count == -1 else args.gpu_count
    if n <= 1:
        return None
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        with preemption.raising_until_launch():
            from torch.distributed.run import main as torchrun_main

            os.environ[FLAGS_REPORTED_ENV] = str(os.getpid())  # the workers inherit it (_stop_with_launcher)
            try:
                torchrun_main(["--standalone", f"--nproc_per_node={n}", "-m", "staged_fast.train", *argv])
            finally:
                os.environ.pop(FLAGS_REPORTED_ENV, None)  # main may run in-process (tests, notebooks)
    except PreemptedBeforeLaunch:
        print(f"stop requested (SIGTERM) before the {n} worker processes started: none launched, nothing "
              "written; run the same command to start", file=sys.stderr)
    except SignalException as e:  # torchrun's agent got the signal, passed it to the workers and waited for them
        from .checkpoint import list_checkpoints

        found = list_checkpoints(args.save_prefix) if args.save_prefix else []
        newest = f"the newest checkpoint is {found[-1]}" if found else "no checkpoint in the run folder"
        print(f"stop requested ({signal.Signals(e.sigval).name}): torchrun passed it to the {n} workers, which "
              "agree to stop one update (or validation batch) later, save a checkpoint and stop (torchrun waits up "
              f"to 30 s for them, then kills them; the last complete checkpoint stays usable): {newest}; run the "
              "same command to continue", file=sys.stderr)
        # SIGTERM is a preemption, as in one process (exit 0); Ctrl-C and the like: the shell's status for it.
        return 0 if e.sigval == signal.SIGTERM else 128 + int(e.sigval)
    except ChildFailedError as e:  # the worker's own error is in its output above; torchrun's table says which
        rank, failure = _cause(e)
        print(f"error: {n} worker processes launched with --gpu_count; rank {rank} failed first:\n{e}",
              file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -N: killed by signal N
    return 0


def _cause(error) -> tuple[int, object]:
    """The failed worker to name: the first by torchrun's timestamps, leaving out ranks that only left because a
    peer went away (exit LOST_PEER_EXIT). A rank killed outright leaves no error file, so torchrun stamps it when
    it notices, which under load came after the survivor's own exit: the job was reported as rank 0's exit 1."""
    causes = {r: f for r, f in error.failures.items() if f.exitcode != LOST_PEER_EXIT}
    if not causes:
        return error.get_first_failure()
    rank = min(causes, key=lambda r: causes[r].timestamp)
    return rank, causes[rank]


def _stop_with_launcher() -> None:
    """In a worker of the --gpu_count launcher: a SIGTERM when the launcher dies, even by kill -9 (Linux's
    parent-death signal), so the ranks save and stop as when preempted. torchrun starts each worker in a session
    of its own: they used to train on as orphans, holding the run folder's lock, where a scheduler that stops a
    job by its process group could not reach them."""
    launcher = os.environ.get(FLAGS_REPORTED_ENV)
    if launcher is None or "RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != int(launcher):  # it died before the call above: the signal would never come
        os.kill(os.getpid(), signal.SIGTERM)


def _own_run_folder(run_dir: Path, dist, log) -> RunLock | None:
    """Rank 0 takes the run folder's lock (one owner per run), then removes what interrupted checkpoint
    writes left there; every rank learns whether it could."""
    lock, error = None, None
    if dist.is_main:
        try:
            lock = RunLock(run_dir).acquire()
            if lock.warning:
                print(lock.warning, file=sys.stderr)
            for name in restore_moved_aside(run_dir):
                log(f"restored checkpoint {name} of {run_dir}: an interrupted re-save had moved it aside")
            count, freed = remove_leftovers(run_dir)
            if count:
                log(f"removed {count} leftover temporary folder(s) of interrupted checkpoint writes "
                    f"({freed:,} bytes) from {run_dir}")
        except RunFolderError as e:
            error = str(e)
    error = D.broadcast_object(error, dist)
    if error is not None:
        raise RunFolderError(error)
    return lock


class Determinism:
    """--deterministic for one run: torch's deterministic algorithms (the flash attention backward reads
    the flag and takes its split, atomic-free dQ) and the cuBLAS workspace setting they need on CUDA.
    restore() gives back what the caller had: main may run in-process (tests, notebooks)."""

    def __init__(self):
        self._saved = None

    def enable(self) -> None:
        self._saved = (torch.are_deterministic_algorithms_enabled(),
                       torch.is_deterministic_algorithms_warn_only_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        if self._saved[2] is None and torch.cuda.is_initialized():  # main called in a process that used the GPU
            warnings.warn("--deterministic: this process has used CUDA already and CUBLAS_WORKSPACE_CONFIG is "
                          "unset; torch reads it once, at the first cuBLAS matmul, so if one ran, the run's "
                          "first matmul raises. Set CUBLAS_WORKSPACE_CONFIG=:4096:8 before starting Python.")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS matmul
        torch.use_deterministic_algorithms(True)

    def restore(self) -> None:
        if self._saved is None:
            return
        enabled, warn_only, cublas = self._saved
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
        self._saved = None


LOST_PEER_EXIT = 3  # a rank that stops because another died: not the job's cause (see _cause)


class PreemptedBeforeLaunch(BaseException):
    """A SIGTERM while --gpu_count launches its workers. A BaseException, as KeyboardInterrupt: it must pass
    through torchrun's `except Exception` handlers (which record errors) untouched."""


class Preemption:
    """SIGTERM (a scheduler preempting the job, to one rank or all) from the first line of main on (run as
    `python -m staged_fast.train`, from this module's first lines: one during the imports is kept). Before
    the trainer exists (rendezvous, data, model, resume) the request is kept and handed to it, and the ranks
    leave before their first update; after, the trainer saves at the next update boundary and stops (with
    several ranks one update later: their stop vote is read one update late, see distributed.StopVote). Without
    this, a SIGTERM during the start killed that rank and torchrun reported the whole job as failed."""

    def __init__(self):
        self.trainer = None
        self.requested = bool(_SIGTERM_WHILE_IMPORTING)  # arrived while `python -m staged_fast.train` imported
        previous = signal.signal(signal.SIGTERM, self._handle)
        self.previous = signal.SIG_DFL if previous is _sigterm_while_importing else previous

    def _handle(self, signum, frame):
        self.requested = True
        if self.trainer is not None:
            self.trainer.stop_requested = True

    def attach(self, trainer) -> None:
        self.trainer = trainer
        if self.requested:  # arrived during the start
            trainer.stop_requested = True

    @contextlib.contextmanager
    def raising_until_launch(self):
        """--gpu_count's launch: here a SIGTERM raises PreemptedBeforeLaunch, out of torchrun's start-up, until
        torchrun's agent installs its own handler just before it spawns the workers (recording it instead, as
        before, let the workers start and train on as if no signal had come)."""

        def raise_preempted(signum, frame):
            self.requested = True
            raise PreemptedBeforeLaunch

        signal.signal(signal.SIGTERM, raise_preempted)
        try:
            if self.requested:  # arrived before this point
                raise PreemptedBeforeLaunch
            yield
        finally:
            signal.signal(signal.SIGTERM, self._handle)

    def close(self) -> None:
        """The handler main found (a caller's, e.g. a test process calling main in-process) comes back."""
        signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)


def _finish_line(args, trainer, summary: dict, prefix_given: bool) -> str:
    """The run's last line. A run stopped early (a SIGTERM, --stop_at_step) also says how to continue it: the
    same command where it already resumes its own folder, else the flags that make it (a run without
    --save_prefix got a new timestamped folder, and a requeue of its command would start afresh in another)."""
    saved = summary["checkpoint"] or "none written (nothing trained since the start)"
    done = f"step {trainer.step}, {trainer.tokens:,} tokens, checkpoint {saved}"
    stopped = summary.get("stopped")
    if stopped is None or trainer.step >= args.train_steps:
        return f"done: {done}"
    # --stop_at_step would stop the same command again at once; --doubling would grow its checkpoint again
    same = stopped == "SIGTERM" and prefix_given and args.resume == "latest" and not args.doubling
    if summary["checkpoint"] is None and not args.doubling:  # nothing trained: nothing new to continue from
        how = "the same command starts it again"
    else:
        how = "the same command continues" if same else (
            f"to continue: --resume latest --save_prefix {args.save_prefix}"
            + (" without --stop_at_step" if args.stop_at_step is not None else "")
            + (" without --doubling" if args.doubling else ""))
    return f"stopped ({stopped}) at step {trainer.step} of {args.train_steps}: {done}; {how}"


def main(argv: list[str] | None = None) -> int:
    preemption = Preemption()
    determinism = Determinism()
    argv = sys.argv[1:] if argv is None else argv
    demo = demo_argv(argv)
    if demo is not None:  # no arguments (or only --arch): the staged demo of that family
        print("staged_fast.train: no arguments, running the staged demo: " + " ".join(demo), flush=True)
        argv = demo
    user_errors = _user_errors()
    dist = None
    trainer = None
    lock = None
    finished = False  # the ranks meet at a barrier only after a clean finish
    try:
        args = parse_args(argv)
        if args.deterministic:
            determinism.enable()
        relaunched = _relaunch_for_gpu_count(args, argv, preemption)
        if relaunched is not None:
            return relaunched
        _stop_with_launcher()  # after main's SIGTERM handler is in place: it saves and stops
        dist = D.init(args.device, args.parallel)
        prefix_given = args.save_prefix is not None
        if args.save_prefix is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            args.save_prefix = D.broadcast_object(f"runs/{args.size or 'model'}-{stamp}", dist)
        from .trainer import Trainer, run

        # tqdm.write prints above the progress bar instead of through it (a growth's line, a warning)
        log = (lambda msg: tqdm.write(str(msg))) if dist.is_main else (lambda *a, **k: None)
        lock = _own_run_folder(Path(args.save_prefix), dist, log)
        trainer = Trainer(args, dist, log=log)
        preemption.attach(trainer)
        summary = run(trainer, progress=not args.no_progress)
        log(_finish_line(args, trainer, summary, prefix_given))
        finished = True
        return 0
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if dist is None or not D.lost_peer(e, dist):
            raise
        print(f"error: rank {dist.rank} lost its connection to another rank ({str(e).splitlines()[0][:300]}): one "
              f"died or was killed (torchrun's summary names it). The last complete checkpoint in "
              f"{args.save_prefix} is intact: run the same command to continue from it.", file=sys.stderr)
        return LOST_PEER_EXIT
    finally:
        if trainer is not None:
            trainer.close()
        if dist is not None:
            D.close(dist, barrier=finished)
        if lock is not None:  # a failed start leaves no folder it created
            lock.release()
        preemption.close()
        determinism.restore()


def _exit_after_distributed_run(code: int) -> None:
    """Leave a torchrun worker without the interpreter's teardown. main() has already closed everything
    (checkpoints fsync'ed and renamed, metrics files closed, barrier, destroy_process_group, lock released);
    during the teardown that follows, a rank of a finished FSDP2-over-gloo job occasionally aborted
    ("terminate called without an active exception": a C++ thread destroyed while joinable; seen under
    heavy load on CPU, cause not found), which made torchrun report a finished job as failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_after_distributed_run(exit_code)
    sys.exit(exit_code)
