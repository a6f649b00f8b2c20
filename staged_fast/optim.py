"""AdamW's parameter groups: weight decay on the matrices (embeddings included), none on biases and norm gains.

As nanoGPT and llm.c do: decaying a LayerNorm/RMSNorm gain or a bias pulls it towards 0 rather than towards
its neutral value, for no regularising effect. The groups are [decay, no decay], each in the model's parameter
order; growth keeps a parameter's group (staged_fast.growth maps groups by name). Checkpoints keep the state by
name, so `state_in_layout` resumes one written with any grouping (before this, one group held every parameter).
"""
from __future__ import annotations

import torch


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """[{params: matrices, weight_decay}, {params: vectors, weight_decay: 0}] in the model's order."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def names_in_optimizer_order(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order of optimizer.state_dict()'s integer ids (groups flattened)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


# AdamW's hyperparameters a resumed run takes from its command, not its checkpoint: a continued run's command
# fills the flags it leaves out from the checkpoint, so they agree unless the command changes them (it used to be
# ignored: --adam_beta2 0.95 on a resume trained on with 0.98 while the next checkpoint recorded 0.95).
COMMAND_DECIDES = ("weight_decay", "betas", "eps")


def state_in_layout(optimizer: torch.optim.Optimizer, model: torch.nn.Module, saved: dict,
                    saved_names: list[str]) -> dict:
    """A saved optimizer.state_dict() (integer ids over `saved_names`) rearranged by parameter name into
    `optimizer`'s groups, ready for its load_state_dict. Each group keeps the saved hyperparameters of its first
    parameter's saved group, except COMMAND_DECIDES, which the command line (the grouping, the flags) decides."""
    names = names_in_optimizer_order(model, optimizer)
    if sorted(names) != sorted(saved_names):
        raise ValueError(f"the saved optimizer state covers other parameters than this model's (differing: "
                         f"{sorted(set(names) ^ set(saved_names))[:3]})")
    by_name = {saved_names[i]: s for i, s in saved["state"].items()}
    group_of = {saved_names[i]: g for g in saved["param_groups"] for i in g["params"]}
    state, groups, start = {}, [], 0
    for group in optimizer.param_groups:
        ids = list(range(start, start + len(group["params"])))
        start += len(ids)
        for i in ids:
            if names[i] in by_name:
                state[i] = by_name[names[i]]
        source = group_of[names[ids[0]]] if ids else {k: v for k, v in group.items() if k != "params"}
        hyper = {k: v for k, v in source.items() if k != "params"}
        groups.append(dict(hyper, params=ids, **{k: group[k] for k in COMMAND_DECIDES}))
    return {"state": state, "param_groups": groups}

