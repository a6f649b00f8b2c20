"""Helpers for end-to-end training tests: small, fast runs of the real CLI entry point."""
from __future__ import annotations

from pathlib import Path

from staged_fast.metrics import read_metrics
from staged_fast.train import main

TINY = [
    "--size", "tiny", "--seqlen", "64", "--batch_size", "4", "--warmup_steps", "5", "--log_rate", "1",
    "--val_every", "1000", "--val_batches", "2", "--no_progress", "--save_every", "1000", "--device", "cpu",
]


def train(run_dir: Path, cache: str, *extra: str) -> int:
    base = TINY[2:] if "--schedule" in extra else TINY  # a plan sets the size itself
    return main([*base, "--save_prefix", str(run_dir), "--cache_dir", cache, *extra])


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]
