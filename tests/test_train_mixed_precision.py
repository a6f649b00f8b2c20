"""The trainer's mixed-precision paths with the Triton kernels: --bf16 (autocast) and --fp16 (autocast +
GradScaler) once crashed at update 1 (the fused residual layer norm rejected a 16-bit branch output
beside the fp32 residual stream). Five real updates each, through the CLI: on CPU under the interpreter
with a 512-token BPE (the GPT-2 vocabulary's LM head is the slow part there), compiled on a GPU."""
import math
import os

import pytest
import torch

from train_utils import losses, train

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_five_updates_with_triton_kernels(tmp_path, small_vocab, precision):
    tokenizer, cache = small_vocab
    args = ["--kernels", "triton", precision, "--train_steps", "5", "--seqlen", "37", "--batch_size", "2",
            "--dropout", "0.1", "--val_batches", "1", "--tokenizer", tokenizer, "--device", DEVICE]
    assert train(tmp_path / "run", cache, *args) == 0
    curve = losses(tmp_path / "run")
    assert len(curve) == 5 and all(math.isfinite(v) for v in curve), curve
    assert curve[-1] < curve[0], curve  # five updates of a fresh model on real text lower the loss


def test_compile_recompiles_once_after_growth(tmp_path, small_vocab):
    """--compile wraps the training model in torch.compile; after in-run growth the grown model gets a
    fresh compiled wrapper (compiled once more), and training continues with finite losses."""
    import torch._dynamo

    tokenizer, cache = small_vocab
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    args = ["--size", "tiny_div2_width", "--kernels", "torch", "--compile", "aot_eager", "--train_steps", "6",
            "--grow_at", "3", "--grow_ops", "width", "--seqlen", "32", "--batch_size", "2", "--val_batches", "1",
            "--tokenizer", tokenizer, "--device", DEVICE]
    assert train(tmp_path / "run", cache, *args) == 0
    curve = losses(tmp_path / "run")
    assert len(curve) == 6 and all(math.isfinite(v) for v in curve), curve
    frames = torch._dynamo.utils.counters["frames"]
    assert frames["ok"] >= 2, dict(frames)  # the small model's graph, then the grown one's
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def test_deterministic_runs_the_split_dq_and_repeats_bit_for_bit(tmp_path, small_vocab, monkeypatch):
    """--deterministic: torch's deterministic algorithms for the run (every op of a bf16 Triton training step
    has one: nothing raises), the attention backward's split dQ (its dQ kernel launches), two runs of the
    same command give the same losses to the bit, and the caller's settings come back afterwards."""
    from staged_fast.kernels import attention

    tokenizer, cache = small_vocab
    launched, launch = [], attention._launch_dq
    monkeypatch.setattr(attention, "_launch_dq", lambda *a, **kw: launched.append(1) or launch(*a, **kw))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    args = ["--deterministic", "--kernels", "triton", "--bf16", "--train_steps", "2", "--seqlen", "37",
            "--batch_size", "2", "--dropout", "0.1", "--val_batches", "1", "--tokenizer", tokenizer, "--device", DEVICE]
    curves = []
    for run in ("a", "b"):
        assert train(tmp_path / run, cache, *args) == 0
        curves.append(losses(tmp_path / run))
    assert len(launched) >= 2 * 2  # every update's attention backward, in both runs
    assert len(curves[0]) == 2 and curves[0] == curves[1], curves
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
