"""Training metrics: JSONL log, optional TensorBoard, and model FLOPs utilization (MFU)."""
from __future__ import annotations

import contextlib
import errno
import json
import time
from pathlib import Path

import torch

# Dense bf16 (fp16 on V100) tensor-core peaks in FLOP/s, no sparsity, from the vendors' datasheets. Matched
# in order by substring of torch.cuda.get_device_name(), so the specific parts (PCIe, NVL) come before the
# SXM ones; unknown devices report no MFU.
DEVICE_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),  # SXM, and GH200
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("V100", 125e12),
    ("RTX 4090", 165e12),
)


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DEVICE_PEAK_FLOPS if key in name), None)


def flops_per_token(n_params_non_embedding: int, n_layer: int, n_embd: int, seqlen: int) -> float:
    """Training FLOPs per token: 6N for the weight matmuls plus 12*L*T*d for attention scores and values
    (PaLM, app. B). The causal mask's halving is not applied, so figures compare with nanoGPT's MFU."""
    return 6.0 * n_params_non_embedding + 12.0 * n_layer * n_embd * seqlen


class RateWindow:
    """Token rates over one log interval: by the wall clock, and by training time alone.

    `paused()` takes validation, growth and checkpoint saves off the training clock. It waits for the device
    on entering (the updates launched before it belong to training) and on leaving, so on a GPU the split is
    exact without a wait per update; on the CPU `sync` does nothing. The first update's compile and the
    recompile after a growth stay on the training clock: they happen inside an update."""

    def __init__(self, tokens: int, sync=lambda: None):
        self.sync = sync
        self.restart(tokens)

    def restart(self, tokens: int) -> None:
        self.start, self.tokens, self.paused_s = time.perf_counter(), tokens, 0.0

    @contextlib.contextmanager
    def paused(self):
        self.sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.paused_s += time.perf_counter() - t

    def rates(self, tokens: int) -> tuple[float, float]:
        """(wall tokens/s, training tokens/s) since the window's start, after waiting for the device."""
        self.sync()
        wall = time.perf_counter() - self.start
        done = tokens - self.tokens
        return done / max(wall, 1e-9), done / max(wall - self.paused_s, 1e-9)


def _write_failed(path: Path, e: OSError):
    """A metrics write the disk refused, as the run folder's error (exit 2, no traceback): it used to be an
    OSError traceback mid-run, or at the start of a requeue on a disk still full."""
    from .run_folder import RunFolderError

    why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror
    return RunFolderError(f"cannot write {path} ({why}). The run stopped; its last complete checkpoint in "
                          f"{path.parent} is intact. Free space (or fix the folder) and run the same command to "
                          f"continue from it.")


class MetricsLogger:
    """Rank 0 only: appends one JSON object per record to metrics.jsonl (resumed runs keep appending).

    `keep_until`: the update (iteration) the run starts from. Records logged after it by an earlier attempt
    that was killed before its next checkpoint, and a line torn by the kill, are dropped first, so the log
    holds one line per update; 0 starts a fresh log. None leaves the file as it is. `keep_lines`: the lines the
    file held when that checkpoint was saved (`lines`, kept in checkpoints since), which says exactly where to
    cut; without it, `pending` says that update's checkpoint was saved with its validation cut short, so its
    validation and growth records came after it."""

    def __init__(self, run_dir: Path | None, tensorboard: bool = False, keep_until: int | None = None,
                 pending: bool = False, keep_lines: int | None = None):
        self.path = None if run_dir is None else Path(run_dir) / "metrics.jsonl"
        self.writer = None
        self.dropped = self.lines = 0
        if self.path is not None and keep_until is not None:
            self.lines, self.dropped = truncate_metrics(self.path, keep_until, pending, keep_lines)
        elif self.path is not None and self.path.exists():
            self.lines = len(self.path.read_bytes().splitlines())
        if run_dir is not None and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # x axis: the update (iteration), which only grows (the step counter moves back at a growth with
            # --restart_steps); purge_step hides what an earlier attempt logged after the update resumed from
            purge = None if keep_until is None else keep_until + 1
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def log(self, record: dict) -> None:
        if self.path is None:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a torn line is dropped by the next run's truncate_metrics
            raise _write_failed(self.path, e) from e
        self.lines += 1
        if self.writer is not None and "iteration" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "iteration":
                    self.writer.add_scalar(key, value, record["iteration"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def truncate_metrics(path: str | Path, iteration: int, pending: bool = False,
                     keep_lines: int | None = None) -> tuple[int, int]:
    """Cut a metrics.jsonl back to its first `keep_lines` lines where given, else to the records of updates
    1..`iteration` (and anything logged before the first later record), with `pending` also before update
    `iteration`'s validation or growth record (logged after a checkpoint whose validation was cut short); a torn
    or unreadable line ends the kept part. Rewritten atomically; returns (lines kept, lines dropped)."""
    import os

    path = Path(path)
    if not path.exists():
        return 0, 0
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    keep = []
    if iteration > 0:
        for line in lines:
            if keep_lines is not None and len(keep) == keep_lines:
                break
            try:
                record = json.loads(line)
            except ValueError:
                break
            if not line.endswith("\n"):
                break
            at = record.get("iteration", 0) if isinstance(record, dict) else 0
            if keep_lines is None and (at > iteration or (
                    pending and at == iteration and record.get("event") in ("validation", "growth"))):
                break
            keep.append(line)
    if len(keep) == len(lines):
        return len(keep), 0
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_failed(path, e) from e
    return len(keep), len(lines) - len(keep)


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
