"""torchrun worker of tests/test_distributed.py: grow one checkpoint under FSDP2 (gather-grow-reshard) with
every operator and write the consolidated grown weights and AdamW states (rank 0) for comparison."""
import sys

import torch

from staged_fast import distributed as D
from staged_fast.checkpoint import load_checkpoint
from staged_fast.model import GPT
from staged_fast.sharded import gather_full, grow_gather_reshard, load_full, shard

CASES = [("width", 0.0), ("width", 0.01), ("alternate_id", 0.0), ("append_id", 0.0), ("alternate_copy", 0.0),
         ("append_copy", 0.0)]


def make_optimizer(model, lr):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0, fused=True)


def main(ckpt_path: str, out: str) -> None:
    info = D.init("cpu", "fsdp")
    ck = load_checkpoint(ckpt_path)  # consolidated full state, as every rank starts from
    results = {}
    for op, noise in CASES:
        model = GPT(ck.config)
        model.load_state_dict(ck.model_state)
        shard(model)
        opt = make_optimizer(model, lr=1e-3)
        load_full(model, opt, None, ck.optimizer_state, ck.param_names)
        grown, grown_opt = grow_gather_reshard(model, opt, op, make_optimizer=make_optimizer, width_noise=noise,
                                               generator=torch.Generator().manual_seed(7), optimizer_step=None)
        local = {n: p.to_local().numel() for n, p in grown.named_parameters()}
        msd, osd, names = gather_full(grown, grown_opt)
        if info.is_main:
            results[f"{op}-{noise}"] = (msd, osd, names, local)
    if info.is_main:
        torch.save(results, out)
    D.close(info)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
