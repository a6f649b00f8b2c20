"""Shared benchmark harness: timing with warm-up, median and quantiles, peak memory, provenance.

Every benchmark measures the fast path and its baseline in the same run and prints their ratio,
because these machines are noisy: absolute numbers move, ratios within one run are what we claim.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Timing:
    name: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    samples: list | None = None  # per-call ms, in order (interleaved timings: call i of every fn is round i)

    def __str__(self) -> str:
        return f"{self.name}: {self.median_ms:.3f} ms (p20 {self.p20_ms:.3f}, p80 {self.p80_ms:.3f}, n={self.reps})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, *, name: str = "", device="cpu", warmup: int = 3, reps: int = 10, min_time_s: float = 0.0) -> Timing:
    """Median wall time of fn() in ms after `warmup` calls; CUDA is synchronized around each call."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    start_all = time.perf_counter()
    while len(samples) < reps or (time.perf_counter() - start_all) < min_time_s:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return _timing(name, samples)


def time_interleaved(fns: dict, *, warmup: int = 3, reps: int = 10) -> dict[str, Timing]:
    """Median CPU wall time of each fn in ms, timed in rounds (one call of each fn per round, in turn),
    so a burst of load from another process lands on every fn alike instead of on whichever ran then."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _timing(name, s, keep=True) for name, s in samples.items()}


def paired_ratio(baseline: Timing, other: Timing) -> float:
    """Median over rounds of baseline ms / other ms, from interleaved timings: each round's two calls saw the
    same load, so a slow stretch of the machine cancels out instead of landing in one row's median."""
    return statistics.median(b / o for b, o in zip(baseline.samples, other.samples))


def _timing(name: str, samples: list[float], keep: bool = False) -> Timing:
    q = statistics.quantiles(samples, n=5) if len(samples) >= 5 else [min(samples)] * 4
    return Timing(name, statistics.median(samples), q[0], q[-1], len(samples), samples if keep else None)


def time_kernel(fn, *, name: str = "", device="cpu", warmup: int = 3, reps: int = 10) -> Timing:
    """Median time of a GPU kernel call in ms, as kernel benchmarks should take it: CUDA through
    `triton.testing.do_bench` (CUDA events over many back-to-back calls, the L2 cache flushed before
    each, so a small input is not timed from cache); elsewhere `time_fn`."""
    device = torch.device(device)
    if device.type != "cuda":
        return time_fn(fn, name=name, device=device, warmup=warmup, reps=reps)
    import triton.testing

    p20, median, p80 = triton.testing.do_bench(fn, warmup=25, rep=100 if reps <= 10 else 300,
                                               quantiles=[0.2, 0.5, 0.8])
    return Timing(name, median, p20, p80, reps)


def peak_memory_cuda(fn, device="cuda") -> int:
    """Peak bytes allocated on a CUDA device while fn() runs, above what was allocated before."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def provenance() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain aligned table (what RESULTS.md copies)."""
    widths = {c: max([len(c), *(len(_fmt(r.get(c))) for r in rows)]) for c in columns}  # no rows: the headers
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def write_json(path, payload: dict) -> None:
    """Write `payload` and its provenance to `path` atomically (a temporary file renamed over it): a
    benchmark killed by its time limit mid-write leaves the previous version, never half a file."""
    payload = dict(payload, provenance=provenance())
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    os.replace(tmp, path)
