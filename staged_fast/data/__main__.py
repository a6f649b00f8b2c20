"""python -m staged_fast.data: tokenize and cache a corpus ahead of training.

A training run prepares its data itself when the cache lacks it, but on a cluster that happens inside the
job: on its GPUs' time, and again after a preemption that interrupted it. This prepares the very cache entry
a run with the same data flags and --seed reads (the same key), on any machine that sees --cache_dir:

    python -m staged_fast.data --data my_corpus/ --num_workers 16
    python -m staged_fast.train --data my_corpus/ --size GPT2_base ...     # a cache hit: no tokenizing

The split between train and validation depends on --seed (train's default, 1234, is the default here too).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from ..cli_help import HelpFormatter, quiet_on_closed_pipe
from .flags import absolute_data_paths, add_data_flags, cache_dir_problem, tokenizer_path_problem


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m staged_fast.data", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    add_data_flags(p)
    p.add_argument("--seed", type=int, default=1234,
                   help="decides which documents are held out for validation: give the training run the same "
                        "--seed (default 1234, as train)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    absolute_data_paths(args)
    problem = tokenizer_path_problem(args.tokenizer) or cache_dir_problem(args.cache_dir)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..run_folder import RunFolderError, os_error_text
    from ..tokenizer import load_tokenizer
    from .prepare import prepare_data
    from .sources import DataError

    try:
        tokenizer = load_tokenizer(args.tokenizer)
        data = prepare_data(args.data, tokenizer, tokenizer_name=args.tokenizer, cache_dir=args.cache_dir,
                            val_fraction=args.val_fraction, num_proc=args.num_workers, text_field=args.text_field,
                            seed=args.seed, val_data=args.val_data)
    except (DataError, ValueError, RunFolderError) as e:  # the messages name the problem and the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the cache folder: full, read-only, gone
        print(f"error: cannot write the data cache under {args.cache_dir} ({os_error_text(e)}). Fix: give a "
              f"--cache_dir that is (or can become) a folder you can write to, with room for the tokens.",
              file=sys.stderr)
        return 2
    for folder in data.folders:
        meta = json.loads((folder / "meta.json").read_text())
        print(f"{meta['source']}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} validation tokens "
              f"({meta['dtype']}, {meta['documents']:,} document{'s' * (meta['documents'] != 1)}), cached at {folder}")
    print(f"a training run with the same data flags and --seed {args.seed} reads this cache: {data.source}, "
          f"vocabulary {data.vocab_size:,}")
    return 0


if __name__ == "__main__":
    sys.exit(quiet_on_closed_pipe(main))
