"""`python -m staged_fast.export CKPT --out DIR`: a Hugging Face model folder from any checkpoint.

DIR gets config.json (GPT2Config, or LlamaConfig for a llama run), model.safetensors, generation_config.json and
the tokenizer files, so `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load
it, and lm-evaluation-harness runs it with `--model hf --model_args pretrained=DIR`. The shape comes from the
checkpoint's own config, so grown checkpoints (any depth / width) export the same way. The tokenizer is the
checkpoint's own (saved in its folder, else the one its training run used, else GPT-2 BPE) unless --tokenizer
names another; the config's bos/eos token ids are that tokenizer's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .checkpoint import list_checkpoints
from .cli_help import HelpFormatter, quiet_on_closed_pipe
from .evaluate.common import (
    DTYPES, InputError, check_vocab, checkpoint_tokenizer, load_eval_model, load_eval_tokenizer, run_cli,
)
from .hf import save_pretrained

_GPT2_NAMES = ("gpt2", "openai-community/gpt2")


def _check_out(out: Path, overwrite: bool) -> None:
    """Before any work: --out must be a folder that is new or empty (or --overwrite), and not a staged_fast one."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; it must be a folder (the HF files are written into it). "
                         f"Fix: choose another --out.")
    if (out / "meta.json").exists():
        raise InputError(f"--out {out} is a staged_fast checkpoint; exporting into it would mix two formats. "
                         f"Fix: choose an empty folder for --out.")
    if list_checkpoints(out):
        raise InputError(f"--out {out} is a training run's folder (it holds step_ checkpoints): sample, evaluate "
                         f"and export would then load the export in place of the run's newest checkpoint. "
                         f"Fix: choose a folder of its own for --out, e.g. {out}/hf.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"--out {out} exists and is not empty. Fix: choose a new folder, or pass --overwrite.")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise InputError(f"--out {out} cannot be made: {existing} is not a folder you can write. Fix: choose "
                         f"another --out.")


def _source_token_ids(checkpoint: str) -> dict:
    """bos/eos ids of a Hugging Face folder being re-exported (its config.json), when it names them."""
    config = Path(checkpoint).expanduser() / "config.json"
    if (config.parent / "meta.json").exists() or not config.is_file():
        return {}
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return {}
    return {k: data[k] for k in ("bos_token_id", "eos_token_id") if isinstance(data, dict) and k in data}


def export(checkpoint: str, out: str | Path, *, tokenizer: str | None = None, write_tokenizer: bool = True,
           dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Write the HF folder and return its path. `tokenizer` None: the checkpoint's own (checkpoint_tokenizer);
    `write_tokenizer=False` writes the model files only."""
    out = Path(out).expanduser()
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    _check_out(out, overwrite)
    model = load_eval_model(checkpoint, named="checkpoint")
    ids = {"bos_token_id": 50256, "eos_token_id": 50256, **_source_token_ids(checkpoint)}
    tok = None
    if write_tokenizer:
        tokenizer = tokenizer or checkpoint_tokenizer(checkpoint)[0]
        tok = load_eval_tokenizer(tokenizer, checkpoint)
        check_vocab(model, tok)
        tok.model_max_length = model.config.n_positions  # harnesses read the window from here
        ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {out} cannot be made ({e.strerror}). Fix: choose a folder you can write.") from e
    save_pretrained(model.to(DTYPES[dtype]), out, **ids)
    if tok is not None:
        tok.save_pretrained(out)
        if tokenizer in _GPT2_NAMES:
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
    p.add_argument("checkpoint", help="staged_fast checkpoint or run folder (grown or not), or a HF GPT-2 or "
                   "Llama folder")
    p.add_argument("--out", required=True, help="folder to write (created; must be empty unless --overwrite)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to save beside the model (default: the checkpoint's "
                   "own: saved in its folder, else the one its training run used, else GPT-2 BPE)")
    p.add_argument("--no_tokenizer", action="store_true", help="write the model files only")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the saved weights")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    return p


def main(argv=None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_tokenizer and args.tokenizer is not None:
        parser.error("--tokenizer names the tokenizer to save and --no_tokenizer saves none: give one of them.")
    out = export(args.checkpoint, args.out, tokenizer=args.tokenizer, write_tokenizer=not args.no_tokenizer,
                 dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    print(f"load it with AutoModelForCausalLM.from_pretrained({str(out)!r}); lm-evaluation-harness: "
          f"lm_eval --model hf --model_args pretrained={out} --tasks lambada_openai,wikitext")
    return out


if __name__ == "__main__":
    sys.exit(quiet_on_closed_pipe(run_cli, main))
