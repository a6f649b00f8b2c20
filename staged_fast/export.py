"""`python -m staged_fast.export CKPT --out DIR`: a Hugging Face model folder from any checkpoint.

DIR gets config.json (GPT2Config), model.safetensors, generation_config.json and the tokenizer files, so
`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load it, and
lm-evaluation-harness runs it with `--model hf --model_args pretrained=DIR`. The shape comes from the
checkpoint's own config, so grown checkpoints (any depth / width) export the same way.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_help import HelpFormatter
from .evaluate.common import DTYPES, InputError, check_vocab, load_eval_model, run_cli
from .hf import save_pretrained


def export(checkpoint: str, out: str | Path, *, tokenizer: str | None = "gpt2", dtype: str = "fp32",
           overwrite: bool = False) -> Path:
    """Write the HF folder and return its path. `tokenizer=None` writes the model files only."""
    from .tokenizer import load_tokenizer

    out = Path(out).expanduser()
    if (out / "meta.json").exists():
        raise InputError(f"--out {out} is a staged_fast checkpoint; exporting into it would mix two formats. "
                         f"Fix: choose an empty folder for --out.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"--out {out} exists and is not empty. Fix: choose a new folder, or pass --overwrite.")
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    model = load_eval_model(checkpoint)
    tok = None
    if tokenizer is not None:
        try:
            tok = load_tokenizer(tokenizer)
        except ValueError as e:
            raise InputError(str(e)) from e
        check_vocab(model, tok)
        tok.model_max_length = model.config.n_positions  # harnesses read the window from here
    save_pretrained(model.to(DTYPES[dtype]), out)
    if tok is not None:
        tok.save_pretrained(out)
        if tokenizer in ("gpt2", "openai-community/gpt2"):
            # transformers 5 records its generic class name, which transformers 4 (still common beside
            # lm-evaluation-harness) cannot resolve; GPT2TokenizerFast reads tokenizer.json in both.
            config_path = out / "tokenizer_config.json"
            config = json.loads(config_path.read_text())
            config["tokenizer_class"] = "GPT2TokenizerFast"
            config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m staged_fast.export", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="staged_fast checkpoint or run folder (grown or not), or a HF GPT-2 folder")
    p.add_argument("--out", required=True, help="folder to write (created; must be empty unless --overwrite)")
    p.add_argument("--tokenizer", default="gpt2", help="tokenizer to save beside the model (default: GPT-2 BPE)")
    p.add_argument("--no_tokenizer", action="store_true", help="write the model files only")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the saved weights")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    return p


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    out = export(args.checkpoint, args.out, tokenizer=None if args.no_tokenizer else args.tokenizer,
                 dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    print(f"load it with AutoModelForCausalLM.from_pretrained({str(out)!r}); lm-evaluation-harness: "
          f"lm_eval --model hf --model_args pretrained={out} --tasks lambada_openai,wikitext")
    return out


if __name__ == "__main__":
    sys.exit(run_cli(main))
