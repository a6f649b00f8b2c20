"""HellaSwag (validation): choose, of four endings of a short scene, the one the model finds most likely.

Completion style, as build-nanogpt's and llm.c's hellaswag.py score it: each ending, with a leading space, is
scored teacher-forced after the raw `ctx` (no text preprocessing). `acc` picks the ending with the lowest total
NLL; `acc_norm` the lowest mean NLL per token, which does not favour short endings. lm-evaluation-harness
preprocesses the text and prefixes the activity label, so its figures differ somewhat. Random guessing: 0.25.

Contexts longer than the model's window keep their most recent tokens (each ending's row on its own).
"""
from __future__ import annotations

import time
from pathlib import Path

from .common import InputError, describe, read_jsonl
from .targets import fit_to_window, score_targets

HUB_DATASET = "Rowan/hellaswag"  # load_dataset(HUB_DATASET, split="validation")
RAW_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
N_ENDINGS = 4
_FORM = '{"ctx": "...", "endings": ["...", "...", "...", "..."], "label": 0}'


def check_example(row, where: str, what: str = "HellaSwag") -> tuple[str, list[str], int]:
    """(ctx, endings, label) of one example, or an InputError naming what is wrong and the form it needs."""
    if not isinstance(row, dict):
        raise InputError(f"{where} is a {type(row).__name__}, not an object. Fix: one example per line, like {_FORM}.")
    ctx, endings, label = row.get("ctx"), row.get("endings"), row.get("label")
    if not isinstance(ctx, str) or not ctx.strip():
        raise InputError(f"{where} has no text under 'ctx'. Fix: each example needs its context, like {_FORM}.")
    if (not isinstance(endings, list) or len(endings) != N_ENDINGS
            or not all(isinstance(e, str) and e.strip() for e in endings)):
        raise InputError(f"{where} needs {N_ENDINGS} non-empty strings under 'endings', found {endings!r:.120}. "
                         f"Fix: use HellaSwag's own rows, like {_FORM}.")
    try:
        label = int(label)  # the hub's rows hold it as a string
    except (TypeError, ValueError):
        label = None
    if label not in range(N_ENDINGS):
        raise InputError(f"{where} has label {row.get('label')!r}; it must be the right ending's index, 0 to "
                         f"{N_ENDINGS - 1}. Fix: HellaSwag's test split has no labels; use the validation split.")
    return ctx, endings, label


def load_hellaswag(data_file: str | None = None) -> tuple[list[tuple[str, list[str], int]], str]:
    """HellaSwag's validation examples as (ctx, endings, label), from `data_file` (its jsonl) or the hub."""
    if data_file is not None:
        path = Path(data_file).expanduser()
        if not path.is_file():
            raise InputError(f"--data_file {path}: no such file. Fix: check the path, or download {RAW_URL}.")
        return read_jsonl(path, what="HellaSwag", example=_FORM, parse=check_example), str(path)
    try:
        from datasets import load_dataset

        rows = load_dataset(HUB_DATASET, split="validation")
    except Exception as e:  # offline, hub errors, missing cache: many exception types
        raise InputError(f"could not load HellaSwag from the Hugging Face hub ({describe(e)}). Fix: go online once "
                         f"(the dataset is cached afterwards), or download {RAW_URL} and pass it with --data_file.") from e
    examples = [check_example(row, f"{HUB_DATASET} validation row {i}") for i, row in enumerate(rows)]
    return examples, f"hub:{HUB_DATASET}:validation"


def encode(examples, tokenizer, n_positions: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Four (context ids, ending ids) rows per example, each fitted into the window; and the rows cut."""
    rows, truncated = [], 0
    for ctx, endings, _ in examples:
        context = tokenizer.encode(ctx, add_special_tokens=False)
        for ending in endings:
            target = tokenizer.encode(" " + ending.strip(), add_special_tokens=False)
            fitted, cut = fit_to_window(context, target, n_positions, what=f"HellaSwag ending {ending[:40]!r}")
            rows.append((fitted, target))
            truncated += cut
    return rows, truncated


def evaluate_hellaswag(model, tokenizer, examples, *, batch_size: int = 16, device="cpu", dtype: str = "fp32",
                       progress: bool = True) -> dict:
    """acc and acc_norm over `examples` (batch_size counts rows: four per example)."""
    start = time.perf_counter()
    rows, truncated = encode(examples, tokenizer, model.config.n_positions)
    scored = score_targets(model, rows, batch_size=batch_size, device=device, dtype=dtype, progress=progress,
                           desc="hellaswag")
    right = right_norm = 0
    for i, (_, _, label) in enumerate(examples):
        options = scored[N_ENDINGS * i : N_ENDINGS * (i + 1)]
        total = [nll for _, _, nll, _ in options]
        mean = [nll / n for _, _, nll, n in options]
        right += total.index(min(total)) == label
        right_norm += mean.index(min(mean)) == label
    n = len(examples)
    return {
        "task": "hellaswag",
        "examples": n,
        "acc": right / n,
        "acc_norm": right_norm / n,
        "truncated_rows": truncated,
        "dtype": dtype,
        "seconds": time.perf_counter() - start,
    }
