"""Scoring a target continuation after a context, teacher-forced: what LAMBADA and HellaSwag share.

An example is (context ids, target ids). The model reads context + target[:-1] in one pass (examples of a batch
right-padded: a causal model never looks at the pad positions from the real ones), and the outputs from the
context's last position on score the target's tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .common import InputError, autocast


def fit_to_window(context: list[int], target: list[int], n_positions: int, what: str) -> tuple[list[int], bool]:
    """The context cut from the left so that context + target[:-1] fits the window; (context, was it cut)."""
    if len(target) >= n_positions:
        raise InputError(f"the {what} is {len(target)} tokens, longer than the model's window ({n_positions}).")
    keep = n_positions + 1 - len(target)
    if len(context) > keep:
        return context[-keep:], True
    return context, False


@torch.no_grad()
def score_targets(model, examples, *, batch_size: int = 16, device="cpu", dtype: str = "fp32", progress: bool = True,
                  desc: str = "scoring"):
    """Per example: (every target token is the argmax, the last one is, target NLL in nats, target tokens)."""
    device = torch.device(device)
    results = []
    bar = tqdm(total=len(examples), desc=desc, unit="ex", disable=not progress)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        inputs = [ctx + tgt[:-1] for ctx, tgt in chunk]
        x = torch.zeros(len(chunk), max(len(ids) for ids in inputs), dtype=torch.long)
        for row, ids in enumerate(inputs):
            x[row, : len(ids)] = torch.tensor(ids)
        with autocast(device, dtype):
            h = model.hidden_states(x.to(device))  # (B, T, d)
            for row, (ctx, tgt) in enumerate(chunk):
                start = len(ctx) - 1  # the position whose output predicts tgt[0]
                logits = model.lm_head(h[row, start : start + len(tgt)]).float()  # (len(tgt), V)
                target = torch.tensor(tgt, device=device)
                hits = logits.argmax(dim=-1) == target
                nll = F.cross_entropy(logits, target, reduction="sum").item()
                results.append((bool(hits.all()), bool(hits[-1]), nll, len(tgt)))
        bar.update(len(chunk))
    bar.close()
    return results
