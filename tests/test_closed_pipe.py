"""`command | head`: a reader that goes away before the command has written ends it quietly (exit 141, what a
shell shows for cat), not with a BrokenPipeError traceback (seen with `schedule plan | head`)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_with_stdout_closed(args: list[str]) -> subprocess.CompletedProcess:
    """Run `python -m <args>` with stdout a pipe whose read end is closed before the command starts."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=300)
    finally:
        os.close(write_end)


def test_schedule_output_into_a_closed_pipe():
    proc = _run_with_stdout_closed(["staged_fast.schedule", "plan", "--target", "GPT2_base"])
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr[-2000:]
    proc = _run_with_stdout_closed(["staged_fast.schedule", "law", "--help"])  # argparse ignores it itself
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]


def test_sample_output_into_a_closed_pipe(tmp_path):
    import torch

    from staged_fast.checkpoint import save_checkpoint
    from staged_fast.config import GPTConfig
    from staged_fast.model import GPT

    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_embd=32, n_head=2, n_positions=32, dropout=0.0, attn_dropout=0.0)
    ckpt = save_checkpoint(tmp_path, step=1, model=GPT(cfg), config=cfg)
    proc = _run_with_stdout_closed(["staged_fast.sample", "--checkpoint", str(ckpt), "--prompt", "The lighthouse",
                                    "--max_new_tokens", "8", "--num_samples", "3"])
    assert proc.returncode == 141 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
