"""--profile START[:COUNT]: torch.profiler over a window of updates, a Chrome trace per rank and a table of ops.

The profiler starts one update before START (torch's warm-up phase: its start-up cost stays out of the record)
and records updates START .. START+COUNT-1, device kernels included on CUDA. Each rank writes
`<run>/profile/rank<r>_updates<START>-<END>.json` (open in chrome://tracing or https://ui.perfetto.dev); rank 0
prints the ops that took the most time. Profiled updates run slower than the others, and their log records
say so through tokens/s.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

DEFAULT_COUNT = 3


def parse_window(spec: str) -> tuple[int, int]:
    """'START' or 'START:COUNT' -> (start, count); ValueError naming the form otherwise."""
    parts = spec.split(":")
    try:
        start, count = int(parts[0]), int(parts[1]) if len(parts) == 2 else DEFAULT_COUNT
    except (ValueError, IndexError):
        raise ValueError(f"--profile takes START or START:COUNT (update numbers, e.g. 10:3), got {spec!r}") from None
    if len(parts) > 2 or start < 1 or count < 1:
        raise ValueError(f"--profile takes START or START:COUNT with START >= 1 and COUNT >= 1 (e.g. 10:3), got {spec!r}")
    return start, count


class UpdateProfiler:
    """Call `before_update(n)` before update n (1-based) and `after_update(n)` after it."""

    def __init__(self, window: tuple[int, int] | None, run_dir: Path, *, rank: int, device: torch.device, log):
        self.window, self.run_dir, self.rank, self.device, self.log = window, Path(run_dir), rank, device, log
        self.profiler = None
        self.last_update = 0
        self.trace: Path | None = None

    def before_update(self, update: int) -> None:
        if self.window is None or self.profiler is not None:
            return
        start, count = self.window
        if update > start:  # a resumed run past the window
            self.log(f"--profile {start}:{count}: the run starts at update {update}, after the window; nothing profiled")
            self.window = None
            return
        if update < start - 1:
            return
        warmup = start - update  # one warm-up update, or none when the run (or its resumption) starts at START
        if warmup == 0:  # said once in our words, instead of torch's warning
            self.log(f"note: --profile {start}:{count} starts at the run's first update, with none before it to warm "
                     f"the profiler up: update {start}'s record includes the profiler's start-up; a later START leaves "
                     f"it out")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Profiler won't be using warmup")
            schedule = torch.profiler.schedule(wait=0, warmup=warmup, active=count, repeat=1)
        self.profiler = torch.profiler.profile(
            activities=activities, schedule=schedule, on_trace_ready=self._write, record_shapes=True)
        self.profiler.__enter__()

    def after_update(self, update: int) -> None:
        if self.profiler is None:
            return
        self.last_update = update
        self.profiler.step()
        start, count = self.window
        if update >= start + count - 1:
            self.close()

    def close(self) -> None:
        """Stop (also when the run ends inside the window: what was recorded is written)."""
        if self.profiler is not None:
            profiler, self.profiler = self.profiler, None
            profiler.__exit__(None, None, None)  # writes the trace if the window was cut short
            self.window = None

    def _write(self, prof) -> None:
        if self.last_update < self.window[0]:  # stopped in the warm-up update: no update of the window ran
            self.log(f"--profile {self.window[0]}:{self.window[1]}: the run stopped at update {self.last_update}, "
                     f"before the window; nothing profiled")
            return
        updates = f"{self.window[0]}-{self.last_update}"
        trace = self.run_dir / "profile" / f"rank{self.rank}_updates{updates}.json"
        try:
            trace.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(trace))
        except OSError as e:  # e.g. a full disk: the run goes on without its trace (checkpoints say their own)
            self.log(f"warning: could not write the profile trace {trace} ({e}); training continues")
        else:
            self.trace = trace
        if self.rank == 0:
            sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=sort, row_limit=15)
            self.log(f"profile of updates {updates} (rank 0), by {sort}:\n{table}\n"
                     f"trace: {self.trace or 'not written'} (chrome://tracing or ui.perfetto.dev)")
