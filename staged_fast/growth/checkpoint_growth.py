"""Growth of a saved checkpoint (the seed's offline workflow; used by staged_fast.grow and train --doubling)."""
from __future__ import annotations

import logging

import torch

from ..checkpoint import Checkpoint
from ..config import GPTConfig
from ..model import GPT
from .apply import GrowthError, _meta_gpt, _tie, grow_model

log = logging.getLogger("staged_fast.growth")
STATE_ABSENT = "grew weights only; optimizer state was absent"


def model_from_state(config: GPTConfig, state: dict, kernels_backend: str = "torch") -> GPT:
    """A GPT holding the tensors of `state` without copying them (tied head re-tied)."""
    model = _meta_gpt(config, kernels_backend)
    if config.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_embeddings]
    if missing or unexpected:
        raise GrowthError(f"checkpoint weights do not match its config {config.shape_str()}: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    _tie(model)
    return model


def optimizer_from_state(model: GPT, state_dict: dict, param_names: list[str]) -> torch.optim.AdamW:
    """The AdamW a checkpoint saved (its param groups in `param_names` order), state loaded."""
    named = dict(model.named_parameters())
    if sorted(param_names) != sorted(named):
        raise GrowthError(
            f"optimizer parameter mismatch: the checkpoint's optimizer covers {len(param_names)} parameters "
            f"that differ from the model's {len(named)} (e.g. {sorted(set(param_names) ^ set(named))[:3]})"
        )
    groups, flat = [], iter(param_names)
    for g in state_dict["param_groups"]:
        hyper = {k: v for k, v in g.items() if k != "params"}
        groups.append(dict(hyper, params=[named[next(flat)] for _ in g["params"]]))
    optimizer = torch.optim.AdamW(groups)
    optimizer.load_state_dict(state_dict)
    return optimizer


def grow_checkpoint(ckpt: Checkpoint, op: str, **kw) -> tuple[GPTConfig, GPT, torch.optim.AdamW | None]:
    """Grow a loaded checkpoint by `op`; returns (new_config, new_model, new_optimizer or None).

    Keyword arguments go to grow_model (width_noise, generator, optimizer_step, target, backend) plus
    kernels_backend for the model. Without optimizer state in the checkpoint the weights grow alone and
    a warning says "grew weights only; optimizer state was absent" (the returned optimizer is None).
    """
    kernels_backend = kw.pop("kernels_backend", "torch")
    model = model_from_state(ckpt.config, ckpt.model_state, kernels_backend)
    optimizer = None
    if ckpt.optimizer_state is not None and ckpt.param_names is not None:
        optimizer = optimizer_from_state(model, ckpt.optimizer_state, ckpt.param_names)
    else:
        log.warning("%s: %s (checkpoint %s)", op, STATE_ABSENT, ckpt.path)
    ckpt.model_state, ckpt.optimizer_state = {}, None  # the checkpoint's tensors are consumed by growth
    new_model, new_optimizer = grow_model(model, optimizer, op, **kw)
    return new_model.config, new_model, new_optimizer
