"""--activation_checkpointing: each block's activations are recomputed in the backward, with the same dropout
masks, so loss and every gradient equal the run without it, while the forward keeps far less."""
import pytest
import torch

from staged_fast.checkpoint import list_checkpoints, load_checkpoint
from staged_fast.config import GPTConfig
from staged_fast.model import GPT
from train_utils import losses, train

GPT2 = GPTConfig(n_layer=3, n_embd=64, n_head=2, vocab_size=97, n_positions=48, dropout=0.1, attn_dropout=0.1)
LLAMA = GPTConfig(arch="llama", n_layer=3, n_embd=64, n_head=4, n_kv_head=2, vocab_size=97, n_positions=48,
                  intermediate_size=96)


def _loss_and_grads(model, x, checkpointing: bool, dtype=None):
    model.activation_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)  # the same dropout draws for both runs
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = model(x, x)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


CASES = [(config, backend, dtype) for config in (GPT2, LLAMA) for backend in ("torch", "triton")
         for dtype in (None, torch.bfloat16, torch.float16)
         # llama's Triton kernels in the interpreter take ~15 s a case: bf16, what it trains in, stands for them
         if not (config is LLAMA and backend == "triton" and dtype is not torch.bfloat16)]


@pytest.mark.parametrize("config,backend,dtype", CASES,
                         ids=[f"{c.arch}-{b}-{d}".replace("torch.", "") for c, b, d in CASES])
def test_gradients_equal_the_run_without_it(config, backend, dtype):
    """Dropout on, T = 37 (not a multiple of any block): the recomputed forward draws the same masks (the
    checkpoint restores torch's RNG, which seeds the Triton dropout too), so the gradients are the same bits."""
    torch.manual_seed(0)
    model = GPT(config, kernels_backend=backend).train()
    x = torch.randint(0, config.vocab_size, (2, 37))
    loss, grads = _loss_and_grads(model, x, False, dtype)
    loss_ac, grads_ac = _loss_and_grads(model, x, True, dtype)
    assert torch.equal(loss, loss_ac)
    for name, g in grads.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
        assert torch.equal(g, grads_ac[name]), name


def _saved_bytes(model, x, checkpointing: bool) -> int:
    model.activation_checkpointing = checkpointing
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x).backward()
    return sum(saved)


def test_the_forward_keeps_a_fraction_of_the_activations():
    """What autograd keeps for the backward (parameters included): the blocks' activations go, their inputs
    stay; 8 layers at T = 64 keep under a third of it."""
    config = GPT2.replace(n_layer=8, n_positions=64)
    model = GPT(config).train()
    x = torch.randint(0, config.vocab_size, (4, 64))
    full, checkpointed = _saved_bytes(model, x, False), _saved_bytes(model, x, True)
    assert checkpointed < full / 3, (checkpointed, full)


def test_off_in_eval_and_without_grad(monkeypatch):
    """Evaluation (no_grad) and eval mode run the blocks directly: nothing to recompute."""
    import torch.utils.checkpoint

    model = GPT(GPT2)
    model.activation_checkpointing = True
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randint(0, GPT2.vocab_size, (1, 16))
    with torch.no_grad():
        model.train()(x, x)
    model.eval()(x, x).backward()
    assert calls == []
    model.train()(x, x).backward()
    assert len(calls) == GPT2.n_layer


def test_compiles_fullgraph_with_the_custom_ops():
    """torch.compile(fullgraph=True) of the model with the Triton ops inside checkpointed blocks."""
    torch.manual_seed(0)
    model = GPT(GPT2, kernels_backend="triton").train()
    model.activation_checkpointing = True
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randint(0, GPT2.vocab_size, (2, 19))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compiled(x, x)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_cli_trains_the_same_updates_and_keeps_it_through_growth(tmp_path, data_cache):
    """Four updates with dropout, a depth growth after the second: the losses equal the run without it, bit for
    bit, and the grown model checkpoints its activations too."""
    flags = ["--train_steps", "4", "--dropout", "0.1", "--grow_at", "2", "--grow_ops", "append_id"]
    assert train(tmp_path / "plain", data_cache, *flags) == 0
    seen = []
    real = GPT.hidden_states

    def spy(self, *a, **k):
        seen.append((self.config.n_layer, self.activation_checkpointing, self.training))
        return real(self, *a, **k)

    GPT.hidden_states = spy
    try:
        assert train(tmp_path / "ac", data_cache, *flags, "--activation_checkpointing") == 0
    finally:
        GPT.hidden_states = real
    assert losses(tmp_path / "plain") == losses(tmp_path / "ac")
    trained = {(n_layer, on) for n_layer, on, training in seen if training}
    assert trained == {(2, True), (4, True)}, seen
    assert load_checkpoint(list_checkpoints(tmp_path / "ac")[-1]).config.n_layer == 4


def test_under_fsdp_the_losses_equal_the_run_without_it(tmp_path, data_cache):
    """FSDP2 shards each block, and the checkpoint wraps the sharded block's call: the recompute in the backward
    gathers the block's parameters again. Two gloo ranks, dropout on: the same losses, bit for bit."""
    import os
    import subprocess
    import sys

    def run(name, *extra):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
             "staged_fast.train", "--size", "tiny", "--seqlen", "32", "--batch_size", "1", "--train_steps", "3",
             "--warmup_steps", "1", "--log_rate", "1", "--val_every", "1000", "--no_progress", "--device", "cpu",
             "--parallel", "fsdp", "--dropout", "0.1", "--cache_dir", data_cache, "--save_prefix", str(tmp_path / name),
             *extra], env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return losses(tmp_path / name)

    plain = run("plain")
    assert len(plain) == 3 and plain == run("ac", "--activation_checkpointing")


def test_every_other_block_checkpoints_half_and_keeps_the_gradients(monkeypatch):
    """--activation_checkpointing 2: blocks 0, 2, ... are recomputed; what the forward keeps lies between none
    and every block checkpointed; the gradients are the same bits."""
    import torch.utils.checkpoint

    config = GPT2.replace(n_layer=4)
    torch.manual_seed(0)
    model = GPT(config).train()
    x = torch.randint(0, config.vocab_size, (2, 37))
    _, grads = _loss_and_grads(model, x, 0)
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda block, *a, **k: calls.append(block) or real(block, *a, **k))
    _, grads_half = _loss_and_grads(model, x, 2)
    assert calls == [model.transformer.h[0], model.transformer.h[2]]
    for name, g in grads.items():
        assert torch.equal(g, grads_half[name]), name
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", real)
    x = torch.randint(0, config.vocab_size, (4, 48))
    none, half, every = (_saved_bytes(model, x, k) for k in (0, 2, 1))
    assert every < half < none, (every, half, none)


def test_a_negative_interval_is_refused(tmp_path, data_cache, capsys):
    assert train(tmp_path / "run", data_cache, "--train_steps", "2", "--activation_checkpointing", "-1") == 2
    assert "--activation_checkpointing takes how often a block is checkpointed" in capsys.readouterr().err
