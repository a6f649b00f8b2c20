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


_GRAPHS: list[dict] = []  # what the probe backend was given: one entry per compiled graph


def _probe_backend(gm, example_inputs):
    """A torch.compile backend that records each graph (its shape parameters: symbolic sizes mean a
    dynamic-shape compile) and runs it as traced."""
    symbolic = [type(x).__name__ for x in example_inputs if isinstance(x, (torch.SymInt, torch.SymFloat))]
    symbolic += [n.name for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("example_value"),
                                                                                          torch.SymInt)]
    _GRAPHS.append(dict(nodes=len(gm.graph.nodes), symbolic=symbolic))
    return gm.forward


@pytest.fixture
def probe_backend():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    if "staged_probe" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(_probe_backend, name="staged_probe")
    _GRAPHS.clear()
    return _GRAPHS


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_compile_recompiles_once_after_growth_with_static_shapes(tmp_path, small_vocab, probe_backend, parallel):
    """--compile wraps the training model in torch.compile; after in-run growth the grown model gets a
    fresh compiled wrapper, compiled once more, with static shapes, and training continues with finite
    losses. Under FSDP each block is its own frame, and dynamo made the block's n_head (changed by the
    width growth) symbolic: a dynamic-shape graph with shape guards on every call. And the old size's graphs
    stayed on the forward's code object, so with few growths more than dynamo's recompile limit a frame ran
    eager without a word: with the limit at 1 here, the grown model compiled nothing."""
    import torch._dynamo

    tokenizer, cache = small_vocab
    args = ["--size", "tiny_div2_width", "--kernels", "torch", "--compile", "staged_probe", "--train_steps", "6",
            "--grow_at", "3", "--grow_ops", "width", "--seqlen", "32", "--batch_size", "2", "--val_batches", "1",
            "--tokenizer", tokenizer, "--device", DEVICE, "--parallel", parallel]
    with torch._dynamo.config.patch(recompile_limit=1):
        assert train(tmp_path / "run", cache, *args) == 0
    curve = losses(tmp_path / "run")
    assert len(curve) == 6 and all(math.isfinite(v) for v in curve), curve
    assert not torch._dynamo.utils.counters["graph_break"] or parallel == "fsdp", \
        dict(torch._dynamo.utils.counters["graph_break"])  # FSDP2's hooks break the graph by design
    assert len(probe_backend) >= 2 and len(probe_backend) % 2 == 0, probe_backend  # the same graphs at each size
    half = len(probe_backend) // 2
    assert [g["nodes"] for g in probe_backend[:half]] == [g["nodes"] for g in probe_backend[half:]], probe_backend
    assert not [g for g in probe_backend if g["symbolic"]], probe_backend


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


def test_tf32_switches_cuda_fp32_matmuls_only_on_cuda(tmp_path, small_vocab, capsys):
    """--tf32 sets torch's fp32 matmul precision to "high" on CUDA (where the flash kernel's fp32 dots
    follow, tests/test_kernels_attention.py); fp32 on CUDA without it says what is faster; on the CPU it
    changes nothing (oneDNN could take bf16 passes) and says so, and the run trains."""
    from staged_fast.kernels._common import dot_precision
    from staged_fast.trainer import configure_fp32_matmul

    before = torch.get_float32_matmul_precision()
    said = []
    try:
        configure_fp32_matmul(torch.device("cuda"), False, None, said.append)
        assert torch.get_float32_matmul_precision() == "highest" and "--bf16 or --tf32" in said[-1]
        configure_fp32_matmul(torch.device("cuda"), False, torch.bfloat16, said.append)
        assert len(said) == 1  # autocast: nothing to say
        configure_fp32_matmul(torch.device("cuda"), True, None, said.append)
        assert torch.get_float32_matmul_precision() == "high" and dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    tokenizer, cache = small_vocab
    assert train(tmp_path / "run", cache, "--tf32", "--train_steps", "2", "--seqlen", "37", "--batch_size", "2",
                 "--val_batches", "1", "--tokenizer", tokenizer) == 0
    assert "--tf32 has no effect on the CPU" in capsys.readouterr().out
    assert torch.get_float32_matmul_precision() == before == "highest"
