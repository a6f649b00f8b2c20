"""`python -m staged_fast.evaluate {wikitext,lambada,hellaswag} --checkpoint PATH ...`: score a checkpoint.

PATH: a staged_fast checkpoint (step_<8-digit update> folder or run folder, grown or not), a Hugging Face GPT-2
folder (e.g. from `python -m staged_fast.export`), or a hub name such as `gpt2` (needs network).
Prints a result table; `--out result.json` also writes it as JSON.
"""
from __future__ import annotations

import argparse
import sys

from ..cli_help import HelpFormatter, quiet_on_closed_pipe
from .common import (
    DTYPES, InputError, check_out_file, check_vocab, format_table, load_eval_model, load_eval_tokenizer, pick_device,
    run_cli, training_flags, write_json,
)
from .hellaswag import evaluate_hellaswag, load_hellaswag
from .lambada import evaluate_lambada, load_lambada
from .wikitext import evaluate_wikitext, load_wikitext


def _common_args(p: argparse.ArgumentParser, batch_size: int) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="staged_fast checkpoint or run folder, Hugging Face GPT-2 folder, or hub name")
    p.add_argument("--data_file", default=None, help="local copy of the data (default: download from the HF hub)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name or folder (default: the one saved in the checkpoint folder, else GPT-2 BPE)")
    p.add_argument("--batch_size", type=int, default=batch_size, help="sequences per forward pass")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="compute dtype; bf16/fp16 use autocast (weights, layer norms and the loss stay fp32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--kernels", choices=["torch", "triton", "auto"], default="torch",
                   help="layer-norm / attention kernels (auto = triton on CUDA)")
    p.add_argument("--out", default=None, help="also write the result as JSON to this file")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m staged_fast.evaluate", description=__doc__,
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True)
    wt = sub.add_parser("wikitext", formatter_class=HelpFormatter,
                        help="perplexity on WikiText-103 raw test")
    _common_args(wt, batch_size=8)
    wt.add_argument("--context", type=int, default=None,
                    help="tokens per window (default: the --seqlen a staged_fast run trained with, else the "
                         "model's n_positions, 1024 for GPT-2)")
    wt.add_argument("--stride", type=int, default=None,
                    help="sliding window: each window scores only its last STRIDE tokens, so every token has at "
                         "least context - stride tokens of history (default: = context, the seed's "
                         "non-overlapping blocks)")
    lb = sub.add_parser("lambada", formatter_class=HelpFormatter,
                        help="last-word accuracy and perplexity on LAMBADA (OpenAI)")
    _common_args(lb, batch_size=16)
    lb.add_argument("--last_token_only", action="store_true",
                    help="headline accuracy counts only the word's last token (the seed's eval_lambada.py)")
    hs = sub.add_parser("hellaswag", formatter_class=HelpFormatter,
                        help="multiple-choice accuracy (acc, acc_norm) on HellaSwag validation")
    _common_args(hs, batch_size=16)
    hs.add_argument("--limit", type=int, default=None, help="score only the first N examples (a quick check)")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise InputError(f"--batch_size must be at least 1, got {args.batch_size}.")
    check_out_file(args.out)  # before the evaluation, which may take hours
    # Data first: a missing file should fail before the model loads.
    if args.task == "wikitext":
        rows, source = load_wikitext(args.data_file)
    elif args.task == "lambada":
        rows, source = load_lambada(args.data_file)
    else:
        if args.limit is not None and args.limit < 1:
            raise InputError(f"--limit must be at least 1, got {args.limit}.")
        rows, source = load_hellaswag(args.data_file)
        rows = rows[: args.limit]
    device = pick_device(args.device)
    model = load_eval_model(args.checkpoint, device=device, kernels=args.kernels)
    tokenizer = load_eval_tokenizer(args.tokenizer, args.checkpoint)
    check_vocab(model, tokenizer)
    common = dict(batch_size=args.batch_size, device=device, dtype=args.dtype, progress=not args.no_progress)
    if args.task == "wikitext":
        trained = training_flags(args.checkpoint).get("seqlen")
        if args.context is None and isinstance(trained, int) and trained < model.config.n_positions:
            # positions past the run's --seqlen were never trained: scoring them measures nothing useful
            args.context = trained
            print(f"--context {trained}: the --seqlen the run trained with (its position table holds "
                  f"{model.config.n_positions}; pass --context to score longer windows)", file=sys.stderr)
        result = evaluate_wikitext(model, tokenizer, rows, context=args.context, stride=args.stride, **common)
        rows_shown = ["protocol", "context", "stride", "tokens_scored", "loss", "ppl"]
    elif args.task == "lambada":
        result = evaluate_lambada(model, tokenizer, rows, last_token_only=args.last_token_only, **common)
        rows_shown = ["mode", "examples", "accuracy", "acc_whole_word", "acc_last_token", "ppl", "token_ppl"]
    else:
        result = evaluate_hellaswag(model, tokenizer, rows, **common)
        rows_shown = ["examples", "acc", "acc_norm", "truncated_rows"]
    result.update(checkpoint=str(args.checkpoint), data=source, device=str(device),
                  model=dict(model.config.to_dict(), params=model.num_params(non_embedding=False)))
    title = f"{args.task}: {args.checkpoint} ({model.config.shape_str()})"
    print(format_table(title, [(k, result[k]) for k in rows_shown] + [("seconds", result["seconds"])]))
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    sys.exit(quiet_on_closed_pipe(run_cli, main))
