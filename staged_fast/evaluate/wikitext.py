"""WikiText perplexity: the seed's block protocol and a sliding-window (strided) protocol.

Tokens: every row of the dataset's `text` column is tokenized on its own and the ids are concatenated
(as the seed's `eval_wikitext.py`, which followed HF's run_clm preprocessing).

Windows of `context` tokens start at 0, stride, 2*stride, ... and only full windows are used (the tail that
does not fill one is dropped). The first window scores all its tokens but the first; each later window scores
only the tokens no earlier window scored: its last `stride` tokens, so each scored token sees at least
`context - stride` tokens of history. With stride == context (the default) the windows are the seed's
non-overlapping blocks and each block scores its last `context - 1` tokens, exactly as
`GPT2LMHeadModel(input_ids=block, labels=block)` does. Perplexity = exp(total NLL / tokens scored).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .common import InputError, autocast, load_hub_texts, not_utf8_error, read_jsonl_texts

HUB_DATASET = ("wikitext", "wikitext-103-raw-v1")  # load_dataset(*HUB_DATASET, split="test")


def load_wikitext(data_file: str | None = None) -> tuple[list[str], str]:
    """The rows of WikiText-103 raw test (or of `data_file`) and a description of where they came from.

    `data_file`: a raw text file (e.g. `wiki.test.raw` from the original WikiText zip; one row per line, the
    newline kept, blank lines empty, as the HF dataset has them), a `.jsonl` with a `text` field, or a
    `.parquet` file with a `text` column (the HF hub's own files).
    """
    if data_file is None:
        rows = load_hub_texts(HUB_DATASET, what="WikiText-103 test", fix="pass --data_file with a local copy: "
                              "wiki.test.raw from the WikiText-103 raw zip, or the hub's test parquet file.")
        return list(rows), f"hub:{'/'.join(HUB_DATASET)}:test"
    path = Path(data_file).expanduser()
    if not path.is_file():
        raise InputError(f"--data_file {path}: no such file. Fix: check the path (e.g. to wiki.test.raw).")
    if path.suffix in (".jsonl", ".json"):
        return read_jsonl_texts(path, what="WikiText"), str(path)
    if path.suffix == ".parquet":
        from datasets import load_dataset

        ds = load_dataset("parquet", data_files=str(path), split="train")
        if "text" not in ds.column_names:
            raise InputError(
                f"{path} has no 'text' column (columns: {ds.column_names}). Fix: use WikiText's test parquet file."
            )
        return list(ds["text"]), str(path)
    try:
        with open(path, encoding="utf-8") as f:
            rows = [line if line.strip() else "" for line in f]
    except UnicodeDecodeError as e:
        raise not_utf8_error(path, e, "WikiText") from e
    return rows, str(path)


def tokenize_rows(rows: list[str], tokenizer, batch: int = 1000) -> torch.Tensor:
    """Each row tokenized on its own, ids concatenated: a 1-D int64 tensor."""
    ids: list[int] = []
    for i in range(0, len(rows), batch):
        for row_ids in tokenizer(rows[i : i + batch], add_special_tokens=False)["input_ids"]:
            ids.extend(row_ids)
    return torch.tensor(ids, dtype=torch.long)


def window_plan(n_tokens: int, context: int, stride: int) -> list[tuple[int, int]]:
    """(begin, first scored offset inside the window) for every window; see the module docstring."""
    if not 1 <= stride <= context:
        raise InputError(f"--stride {stride} must be between 1 and the context ({context}); larger would skip tokens.")
    if n_tokens < context:
        raise InputError(
            f"the data has only {n_tokens} tokens, fewer than one window of --context {context}. Fix: use a "
            f"smaller --context or more data."
        )
    plan = []
    for k, begin in enumerate(range(0, n_tokens - context + 1, stride)):
        plan.append((begin, 1 if k == 0 else max(1, context - stride)))
    return plan


@torch.no_grad()
def score_tokens(model, tokens: torch.Tensor, *, context: int, stride: int, batch_size: int = 8,
                 device: torch.device | str = "cpu", dtype: str = "fp32", progress: bool = True) -> tuple[float, int]:
    """(total NLL in nats, number of tokens scored) over the windows of `window_plan`."""
    device = torch.device(device)
    plan = window_plan(len(tokens), context, stride)
    nll, count = 0.0, 0
    bar = tqdm(total=len(plan), desc="wikitext", unit="win", disable=not progress)
    for i in range(0, len(plan), batch_size):
        chunk = plan[i : i + batch_size]
        x = torch.stack([tokens[b : b + context] for b, _ in chunk]).to(device)  # (B, T)
        with autocast(device, dtype):
            h = model.hidden_states(x)  # (B, T, d)
            for row, (_, first) in enumerate(chunk):
                # position t predicts token t + 1; score targets first .. T-1
                logits = model.lm_head(h[row, first - 1 : context - 1])  # (n, V)
                loss = F.cross_entropy(logits.float(), x[row, first:context], reduction="sum")
                nll += loss.item()
                count += context - first
        bar.update(len(chunk))
    bar.close()
    return nll, count


def evaluate_wikitext(model, tokenizer, rows: list[str], *, context: int | None = None, stride: int | None = None,
                      batch_size: int = 8, device="cpu", dtype: str = "fp32", progress: bool = True) -> dict:
    """Perplexity of `model` on `rows`; `context` defaults to the model's n_positions, `stride` to `context`."""
    n_positions = model.config.n_positions
    context = n_positions if context is None else context
    if not 2 <= context <= n_positions:
        raise InputError(
            f"--context {context} must be between 2 and the model's n_positions ({n_positions}). Fix: pass "
            f"--context {n_positions} or less."
        )
    stride = context if stride is None else stride
    start = time.perf_counter()
    tokens = tokenize_rows(rows, tokenizer)
    nll, count = score_tokens(model, tokens, context=context, stride=stride, batch_size=batch_size,
                              device=device, dtype=dtype, progress=progress)
    loss = nll / count
    return {
        "task": "wikitext",
        "protocol": "blocks" if stride == context else "sliding_window",
        "context": context,
        "stride": stride,
        "tokens_total": len(tokens),
        "tokens_scored": count,
        "windows": len(window_plan(len(tokens), context, stride)),
        "loss": loss,
        "ppl": math.exp(loss),
        "dtype": dtype,
        "seconds": time.perf_counter() - start,
    }
