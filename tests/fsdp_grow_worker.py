"""torchrun worker of tests/test_distributed.py (2 gloo ranks). Two jobs:

  equal <checkpoint> <out>    grow a checkpoint, a synthetic model whose dims 0 do not split evenly over 2 ranks
                              and an untied llama, under FSDP2 with every operator: inside the shards
                              (grow_sharded) and by gather-grow-reshard; rank 0 writes the consolidated grown
                              weights and AdamW states, the losses on one batch before and after growth and after
                              single-process growth, and each rank's local parameter sizes.
  memory <op> <noise> <out>   each rank's peak resident memory over grow_sharded (VmHWM, reset right before it)
                              above the resident size before the old model was built, with the sizes of the bound,
                              written to <out>/rank<r>.json.
"""
import copy
import json
import sys
from pathlib import Path

import torch

from staged_fast import distributed as D
from staged_fast.checkpoint import load_checkpoint
from staged_fast.config import GPTConfig
from staged_fast.growth import grow_model
from staged_fast.model import GPT
from staged_fast.optim import decay_groups, names_in_optimizer_order, state_in_layout
from staged_fast.sharded import gather_full, grow_gather_reshard, grow_sharded, load_full, shard

CASES = [("width", 0.0), ("width", 0.01), ("alternate_id", 0.0), ("append_id", 0.0), ("alternate_copy", 0.0),
         ("append_copy", 0.0)]
# Every dim 0 odd (vocab, positions, n_embd = 3 heads of 5): rank 1's shards are one row short.
ODD = GPTConfig(n_layer=2, n_embd=15, n_head=3, vocab_size=37, n_positions=15, dropout=0.0, attn_dropout=0.0)
# The llama family with an untied head (its own EMBEDDING-rule parameter), odd vocab.
LLAMA = GPTConfig(arch="llama", n_layer=2, n_embd=24, n_head=4, n_kv_head=2, intermediate_size=40, vocab_size=37,
                  n_positions=16, dropout=0.0, attn_dropout=0.0, tie_embeddings=False)


def make_optimizer(model, lr):
    """The trainer's AdamW: two groups (matrices decayed, vectors not), as the CLI's checkpoints hold."""
    return torch.optim.AdamW(decay_groups(model, 0.1), lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)


def synthetic_start(config):
    """A fresh model after one AdamW update (the same on every rank): (config, model state, AdamW state)."""
    torch.manual_seed(0)
    model = GPT(config)
    opt = make_optimizer(model, 1e-3)
    x = torch.randint(0, config.vocab_size, (2, config.n_positions))
    model(x, x).backward()
    opt.step()
    return config, model.state_dict(), opt.state_dict()


@torch.no_grad()
def loss_of(model, x) -> float:
    return model(x, x).item()


def checkpoint_start(ck):
    """A checkpoint's (config, model state, AdamW state), the state moved by name into make_optimizer's layout
    (a consolidated sharded checkpoint lists its parameters in DCP's order)."""
    model = GPT(ck.config)
    state = state_in_layout(make_optimizer(model, 1e-3), model, ck.optimizer_state, ck.param_names)
    return ck.config, ck.model_state, state


def plain(config, model_state, optimizer_state):
    model = GPT(config)
    model.load_state_dict(model_state)
    opt = make_optimizer(model, lr=1e-3)
    opt.load_state_dict(copy.deepcopy(optimizer_state))
    return model.eval(), opt


def sharded(config, model_state, optimizer_state):
    model = GPT(config)
    model.load_state_dict(model_state)
    names = names_in_optimizer_order(model, make_optimizer(model, lr=1e-3))
    shard(model)
    opt = make_optimizer(model, lr=1e-3)
    load_full(model, opt, None, copy.deepcopy(optimizer_state), names)
    return model.eval(), opt


def equal(ckpt_path: str, out: str) -> None:
    info = D.init("cpu", "fsdp")
    ck = load_checkpoint(ckpt_path)  # consolidated full state, as every rank starts from
    starts = {"checkpoint": checkpoint_start(ck), "odd": synthetic_start(ODD),
              "llama": synthetic_start(LLAMA)}
    results = {"starts": {k: v for k, v in starts.items() if k != "checkpoint"}}
    for source, (config, model_state, optimizer_state) in starts.items():
        batch = torch.Generator().manual_seed(3)
        x = torch.randint(0, config.vocab_size, (2, min(16, config.n_positions)), generator=batch)
        for op, noise in CASES:
            def kwargs():  # a fresh generator for every growth
                return dict(width_noise=noise, generator=torch.Generator().manual_seed(7), optimizer_step=None)

            model, opt = plain(config, model_state, optimizer_state)
            single, _ = grow_model(model, opt, op, **kwargs())
            loss_single = loss_of(single, x)
            del model, opt, single
            model, opt = sharded(config, model_state, optimizer_state)
            loss_before = loss_of(model, x)
            grown, grown_opt = grow_sharded(model, opt, op, **kwargs())  # (the forward left the root unsharded)
            del model, opt
            local = {n: p.to_local().numel() for n, p in grown.named_parameters()}
            loss_after = loss_of(grown, x)
            msd, osd, names = gather_full(grown, grown_opt)
            del grown, grown_opt
            row = dict(msd=msd, osd=osd, names=names, local=local, loss_before=loss_before, loss_after=loss_after,
                       loss_single=loss_single)
            model, opt = sharded(config, model_state, optimizer_state)  # the reference path
            grown, grown_opt = grow_gather_reshard(model, opt, op, make_optimizer=make_optimizer, **kwargs())
            row["gathered"] = gather_full(grown, grown_opt)
            if info.is_main:
                results[f"{source}/{op}-{noise}"] = row
    if info.is_main:
        torch.save(results, out)
    D.close(info)


# ------------------------------------------------------------------------------ memory
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _reset_peak() -> None:  # Linux >= 4.0: VmHWM := current RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


MEMORY_CONFIG = GPTConfig(n_layer=4, n_embd=512, n_head=8, vocab_size=1001, n_positions=64, dropout=0.0,
                          attn_dropout=0.0)  # 4 MiB c_fc / mlp c_proj: 12 MiB a block; vocab 1001: uneven shards


def built_sharded(config):
    """A sharded model and AdamW state allocated shard by shard (no full tensor is ever materialized)."""
    from torch.distributed.tensor import DTensor

    with torch.device("meta"):
        model = GPT(config)
    shard(model)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(torch.distributed.get_rank())
    opt = make_optimizer(model, 1e-3)
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local()
            local.normal_(0, 0.02, generator=gen)
            state = [torch.randn(local.shape, generator=gen), torch.rand(local.shape, generator=gen)]
            state = [DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                        stride=p.stride()) for t in state]
            opt.state[p] = {"step": torch.tensor(10.0), "exp_avg": state[0], "exp_avg_sq": state[1]}
    return model, opt


def memory(op: str, noise: float, out: str) -> None:
    from staged_fast.heap import release_free_heap

    info = D.init("cpu", "fsdp")
    torch.set_num_threads(1)
    # Warm up: page in torch, gloo, the extension and the growth code paths before taking the baseline.
    tiny, tiny_opt = built_sharded(GPTConfig(n_layer=1, n_embd=64, n_head=1, vocab_size=65, n_positions=8))
    tiny(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)).backward()
    tiny_opt.step()
    tiny, tiny_opt = grow_sharded(tiny, tiny_opt, op, width_noise=noise)
    del tiny, tiny_opt
    release_free_heap()
    D.barrier(info)
    base = _rss()
    model, opt = built_sharded(MEMORY_CONFIG)
    largest = max(p.numel() * p.element_size() for p in model.parameters())  # one full old parameter
    old = _rss() - base
    release_free_heap()
    D.barrier(info)
    _reset_peak()
    new, new_opt = grow_sharded(model, opt, op, width_noise=noise, generator=torch.Generator().manual_seed(1))
    peak = _peak() - base
    grown = sum(p.to_local().numel() * p.element_size() for p in new.parameters())
    grown += sum(t.to_local().numel() * t.element_size() for s in new_opt.state.values()
                 for k, t in s.items() if k in ("exp_avg", "exp_avg_sq"))
    full_grown = 3 * sum(p.numel() * p.element_size() for p in new.parameters())
    Path(out, f"rank{info.rank}.json").write_text(json.dumps(dict(
        rank=info.rank, peak=peak, old=old, grown_shard=grown, largest_old=largest, full_grown=full_grown)))
    D.barrier(info)
    D.close(info)


if __name__ == "__main__":
    from staged_fast.train import _exit_after_distributed_run

    if sys.argv[1] == "equal":
        equal(sys.argv[2], sys.argv[3])
    else:
        memory(sys.argv[2], float(sys.argv[3]), sys.argv[4])
    _exit_after_distributed_run(0)  # as the trainer: skip the teardown where a finished gloo rank can abort
