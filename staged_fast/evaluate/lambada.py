"""LAMBADA (OpenAI's version): predict the last word of a passage.

Each passage is split at its last whitespace: context = everything before, target = " " + last word (the
leading space is part of the word as GPT-2 tokenizes running text; the same split as lm-evaluation-harness's
`lambada_openai`). Context and target are tokenized separately, then scored in one teacher-forced pass:

- word accuracy (default): every token of the target is the argmax given the context and the target's
  earlier tokens. That is exactly "greedy decoding, token by token, produces the whole word": as long as
  the earlier tokens match, greedy decoding walks the teacher-forced path. Multi-token words count whole.
- last-token accuracy (`--last_token_only`, the seed's `eval_lambada.py`): only the target's last token
  must be the argmax (given everything before it).
- perplexity: exp(mean over passages of the target word's NLL), as lm-evaluation-harness reports it;
  `token_ppl` divides by target tokens instead.

Passages longer than the model's window keep the target and the most recent context tokens.
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path

from .common import InputError, load_hub_texts, read_jsonl_texts
from .targets import fit_to_window, score_targets

HUB_DATASET = ("EleutherAI/lambada_openai", "default")  # load_dataset(*HUB_DATASET, split="test")
OPENAI_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"
_LAST_WORD = re.compile(r"\s+(\S+)$")


def load_lambada(data_file: str | None = None) -> tuple[list[str], str]:
    """The passages of LAMBADA's OpenAI test set (or of `data_file`, a jsonl of {"text": ...})."""
    if data_file is not None:
        return read_jsonl_texts(data_file, what="LAMBADA"), str(Path(data_file).expanduser())
    rows = load_hub_texts(HUB_DATASET, what="LAMBADA (OpenAI)",
                          fix=f"download {OPENAI_URL} and pass it with --data_file lambada_test.jsonl.")
    return list(rows), f"hub:{HUB_DATASET[0]}:test"


def split_last_word(text: str) -> tuple[str, str]:
    """(context, " " + last word) of a passage."""
    text = text.strip()
    m = _LAST_WORD.search(text)
    if m is None:
        raise InputError(
            f"the LAMBADA passage {text[:60]!r} has fewer than two words, so there is no context to predict its "
            f"last word from. Fix: remove it from the data file."
        )
    return text[: m.start()], " " + m.group(1)


def encode(texts: list[str], tokenizer, n_positions: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """[(context ids, target ids)] fitted into the model's window, and how many contexts were cut."""
    examples, truncated = [], 0
    for text in texts:
        context, target = split_last_word(text)
        tgt = tokenizer.encode(target, add_special_tokens=False)
        ctx, cut = fit_to_window(tokenizer.encode(context, add_special_tokens=False), tgt, n_positions,
                                 what=f"target word {target!r}")
        truncated += cut
        examples.append((ctx, tgt))
    return examples, truncated


def evaluate_lambada(model, tokenizer, texts: list[str], *, last_token_only: bool = False, batch_size: int = 16,
                     device="cpu", dtype: str = "fp32", progress: bool = True) -> dict:
    start = time.perf_counter()
    examples, truncated = encode(texts, tokenizer, model.config.n_positions)
    if any(len(ctx) == 0 for ctx, _ in examples):
        raise InputError("a LAMBADA context tokenized to nothing; every passage needs text before its last word.")
    results = score_targets(model, examples, batch_size=batch_size, device=device, dtype=dtype, progress=progress,
                            desc="lambada")
    n = len(results)
    acc_word = sum(r[0] for r in results) / n
    acc_last = sum(r[1] for r in results) / n
    nll = sum(r[2] for r in results)
    n_tokens = sum(r[3] for r in results)
    return {
        "task": "lambada",
        "mode": "last_token" if last_token_only else "whole_word",
        "accuracy": acc_last if last_token_only else acc_word,
        "acc_whole_word": acc_word,
        "acc_last_token": acc_last,
        "ppl": math.exp(nll / n),
        "token_ppl": math.exp(nll / n_tokens),
        "examples": n,
        "multi_token_targets": sum(r[3] > 1 for r in results),
        "truncated_contexts": truncated,
        "dtype": dtype,
        "seconds": time.perf_counter() - start,
    }
