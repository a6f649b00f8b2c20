"""--activation_checkpointing: each block's activations are recomputed in the backward, with the same dropout
masks, so loss and every gradient equal the run without it, while the forward keeps far less. --ac_policy
matmuls (selective) keeps the matmul and attention outputs too and recomputes the rest, with the same bits."""
import pytest
import torch

from staged_fast import activation_checkpointing as ac
from staged_fast.checkpoint import list_checkpoints, load_checkpoint
from staged_fast.config import GPTConfig
from staged_fast.model import GPT
from train_utils import losses, train

GPT2 = GPTConfig(n_layer=3, n_embd=64, n_head=2, vocab_size=97, n_positions=48, dropout=0.1, attn_dropout=0.1)
LLAMA = GPTConfig(arch="llama", n_layer=3, n_embd=64, n_head=4, n_kv_head=2, vocab_size=97, n_positions=48,
                  intermediate_size=96)


def _loss_and_grads(model, x, checkpointing: bool, dtype=None, policy="full"):
    model.activation_checkpointing = checkpointing
    model.activation_checkpointing_policy = policy
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


def _saved_bytes(model, x, checkpointing: bool, policy="full") -> int:
    """What one forward keeps for the backward: what autograd saves, plus the outputs the selective policy keeps."""
    model.activation_checkpointing = checkpointing
    model.activation_checkpointing_policy = policy
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ac.recording_kept_outputs() as kept:
        loss = model(x, x)
    loss.backward()
    return sum(saved) + sum(t.numel() * t.element_size() for t in kept)


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
    assert train(tmp_path / "sac", data_cache, *flags, "--activation_checkpointing", "--ac_policy", "matmuls") == 0
    assert losses(tmp_path / "plain") == losses(tmp_path / "sac")
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
        # the summary counts FSDP2's sharded parameters whole, as one process would
        assert "model: gpt2 2L/128d/2H, 7.0M parameters" in proc.stdout and "2 fsdp ranks" in proc.stdout
        return losses(tmp_path / name)

    plain = run("plain")
    assert len(plain) == 3 and plain == run("ac", "--activation_checkpointing")
    assert plain == run("sac", "--activation_checkpointing", "--ac_policy", "matmuls")


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


# --ac_policy matmuls: GPT-2 with torch kernels in every precision (attention dropout on: SDPA's math path, its
# dropout recomputed) and without attention dropout (SDPA's fused op kept); the Triton kernels, whose attention op
# is kept with dropout on, in bf16 and fp16; llama (GQA, RoPE, SwiGLU) in bf16. llama's Triton case (~18 s in the
# interpreter) is left out: its attention is the GPT-2 cases' op, and its other Triton ops are recomputed.
SELECTIVE_CASES = [(GPT2, "torch", d) for d in (None, torch.bfloat16, torch.float16)] + [
    (GPT2.replace(attn_dropout=0.0), "torch", torch.bfloat16), (GPT2, "triton", torch.bfloat16),
    (GPT2, "triton", torch.float16), (LLAMA, "torch", torch.bfloat16)]


@pytest.mark.parametrize("config,backend,dtype", SELECTIVE_CASES,
                         ids=[f"{c.arch}-{b}-{d}-attn_dropout{c.attn_dropout}".replace("torch.", "")
                              for c, b, d in SELECTIVE_CASES])
def test_selective_policy_keeps_matmuls_and_attention_with_the_same_gradients(config, backend, dtype):
    """T = 37, dropout on: every gradient equals the run without checkpointing, bit for bit; the forward kept the
    outputs of the block's matmuls and of its attention (unless that attention draws its own dropout: recomputed),
    so it keeps more than full checkpointing and less than none."""
    torch.manual_seed(0)
    model = GPT(config, kernels_backend=backend).train()
    x = torch.randint(0, config.vocab_size, (2, 37))
    loss, grads = _loss_and_grads(model, x, False, dtype)
    decided = []
    policy = ac.keep_matmuls

    def spy(ctx, func, *args, **kwargs):
        decided.append((func.name(), policy(ctx, func, *args, **kwargs), ac.draws_random_numbers(func, args, kwargs)))
        return decided[-1][1]

    ac.keep_matmuls = spy
    try:
        loss_sac, grads_sac = _loss_and_grads(model, x, True, dtype, policy="matmuls")
    finally:
        ac.keep_matmuls = policy
    assert torch.equal(loss, loss_sac)
    for name, g in grads.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
        assert torch.equal(g, grads_sac[name]), name
    kept = {name for name, decision, _ in decided if decision == ac.CheckpointPolicy.MUST_SAVE}
    attention = {"triton": "staged_fast::flash_attention", "torch": "aten::_scaled_dot_product_flash_attention_for_cpu"}
    assert kept & {"aten::mm", "aten::addmm"}, kept
    if backend == "triton" or config.attn_dropout == 0:
        assert attention[backend] in kept, kept
    random = [(name, decision) for name, decision, draws in decided if draws]
    assert all(decision != ac.CheckpointPolicy.MUST_SAVE for _, decision in random), random  # never kept
    assert random or config.dropout == 0, decided  # dropout drew its masks under the policy, and was recomputed
    if ac.CAN_RECORD_KEPT:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            none, full, selective = (_saved_bytes(model, x, k, p) for k, p in ((0, "full"), (1, "full"), (1, "matmuls")))
        assert full < selective < none, (full, selective, none)


def test_the_policy_recomputes_what_draws_random_numbers():
    """A kept op is skipped in the recompute, and a skipped op that drew random numbers would shift every later
    draw: so an attention op with dropout is recomputed, and the same op without dropout is kept."""
    aten = torch.ops.aten
    q = torch.randn(1, 2, 5, 8)
    sdpa = aten._scaled_dot_product_flash_attention_for_cpu.default
    assert ac.draws_random_numbers(sdpa, (q, q, q, 0.1), {})
    assert ac.draws_random_numbers(sdpa, (q, q, q), {"dropout_p": 0.1})
    assert not ac.draws_random_numbers(sdpa, (q, q, q), {})  # the default: 0.0
    assert not ac.draws_random_numbers(sdpa, (q, q, q, 0.0), {})
    assert ac.draws_random_numbers(aten.native_dropout.default, (q, 0.1, True), {})
    assert not ac.draws_random_numbers(aten.mm.default, (q[0, 0], q[0, 0].T), {})
    ctx = ac.SelectiveCheckpointContext(is_recompute=False)
    assert ac.keep_matmuls(ctx, sdpa, q, q, q, 0.1) == ac.CheckpointPolicy.PREFER_RECOMPUTE
    assert ac.keep_matmuls(ctx, sdpa, q, q, q, 0.0) == ac.CheckpointPolicy.MUST_SAVE
    assert ac.keep_matmuls(ctx, aten.addmm.default, q[0, 0], q[0, 0], q[0, 0].T) == ac.CheckpointPolicy.MUST_SAVE
    assert ac.keep_matmuls(ctx, aten.gelu.default, q) == ac.CheckpointPolicy.PREFER_RECOMPUTE


def test_selective_policy_compiles_fullgraph_with_the_custom_ops():
    """torch.compile(fullgraph=True) of the model with the Triton ops in selectively checkpointed blocks: the
    same loss as eager, finite gradients."""
    torch.manual_seed(0)
    model = GPT(GPT2.replace(dropout=0.0, attn_dropout=0.0), kernels_backend="triton").train()
    model.activation_checkpointing, model.activation_checkpointing_policy = 1, "matmuls"
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randint(0, GPT2.vocab_size, (2, 19))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compiled(x, x)
        eager = model(x, x)
    loss.backward()
    assert torch.allclose(loss.detach(), eager.detach(), atol=1e-3)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_policy_without_checkpointing_is_refused(tmp_path, data_cache, capsys):
    assert train(tmp_path / "run", data_cache, "--train_steps", "2", "--ac_policy", "matmuls") == 2
    assert "--ac_policy matmuls says what a checkpointed block keeps, and no block is checkpointed" in capsys.readouterr().err
