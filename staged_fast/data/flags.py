"""The data flags, shared by `python -m staged_fast.train` and `python -m staged_fast.data` (which prepares the
cache ahead): the same flags, paths made absolute alike, so both compute the same cache key."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..cli_types import unit_interval

DEFAULT_CACHE_DIR = "~/.cache/staged_fast"


def add_data_flags(g: argparse._ActionsContainer) -> None:
    """--data, --tokenizer, --text_field, --val_fraction, --val_data, --cache_dir, --num_workers."""
    g.add_argument("--data", nargs="+", default=None, help="text/jsonl/parquet files or folders, or a HF dataset "
                   "name[:config]; default: the bundled corpus")
    g.add_argument("--tokenizer", default="gpt2", help="'gpt2' (offline GPT-2 BPE) or a HF tokenizer folder/name")
    g.add_argument("--text_field", default="text", help="field of jsonl/parquet/HF records holding the text")
    g.add_argument("--val_fraction", type=unit_interval, default=0.01, help="share of tokens held out for validation (whole documents)")
    g.add_argument("--val_data", nargs="+", default=None, help="a separate validation set (the forms --data takes): "
                   "--data is then all train, and --val_fraction does not apply")
    g.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR, help="where tokenized data is cached")
    g.add_argument("--num_workers", type=int, default=1, help="seed flag: processes used to tokenize")


def absolute_local(path: str) -> str:
    """A local path made absolute (it is recorded, and a requeue may start elsewhere); a hub name as given."""
    local = os.path.expanduser(path)
    return os.path.abspath(local) if os.path.exists(local) else path


def absolute_data_paths(args) -> None:
    """--data, --val_data, --tokenizer and --cache_dir with their local paths absolute, in place."""
    for name in ("data", "val_data"):
        if getattr(args, name):
            setattr(args, name, [absolute_local(p) for p in getattr(args, name)])
    args.tokenizer = absolute_local(args.tokenizer)
    args.cache_dir = os.path.abspath(os.path.expanduser(args.cache_dir))


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub name ('org/name' has one slash)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def tokenizer_path_problem(tokenizer: str) -> str | None:
    """What is wrong with a --tokenizer that names a missing folder (said at once: a hub lookup of it retries
    for ~30 s offline), or None."""
    if tokenizer in ("gpt2", "openai-community/gpt2") or not looks_like_path(tokenizer) \
            or Path(tokenizer).expanduser().exists():
        return None
    return (f"--tokenizer {tokenizer}: no such folder. Give a folder holding a saved tokenizer (tokenizer.json, or "
            f"vocab/merges files, e.g. written by tokenizer.save_pretrained), or 'gpt2' for the GPT-2 BPE built "
            f"offline.")


def cache_dir_problem(cache_dir: str) -> str | None:
    """What is wrong with a --cache_dir that cannot hold the cache (a file, or under one), or None."""
    path = Path(cache_dir).expanduser()
    existing = path
    try:
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if existing.is_dir():
            return None
    except OSError:  # a folder this user cannot search: writing there will say so, naming it
        return None
    where = "is a file" if existing == path else f"lies under a file ({existing})"
    return f"--cache_dir {cache_dir} {where}; the tokenized data is cached in a folder. Give another --cache_dir."
