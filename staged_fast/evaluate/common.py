"""What the evaluation, sampling and export CLIs share: loading a model and its tokenizer from any
checkpoint we accept, the compute dtype, the result table / JSON, and turning bad input into one clear
error message and a non-zero exit.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, load_model, read_trainer_state, resolve_checkpoint
from ..cli_types import out_file_problem

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def describe(exc: BaseException) -> str:
    """`Type: message` of an exception on one line, without a trailing period (for use inside a sentence)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split()).rstrip('.')}"


class InputError(ValueError):
    """Bad input to a CLI (a missing file, a malformed dataset, an unusable checkpoint).

    The message is one paragraph: what is wrong, then how to fix it. The CLIs print it and exit 1.
    """


def load_hub_texts(hub: tuple[str, str], *, what: str, fix: str) -> list[str]:
    """The `text` column of a hub dataset's test split, or an InputError that says how to work offline."""
    try:
        from datasets import load_dataset

        return list(load_dataset(*hub, split="test")["text"])
    except Exception as e:  # offline, hub errors, missing cache: many exception types
        raise InputError(
            f"could not load {what} from the Hugging Face hub ({describe(e)}). Fix: go online once (the "
            f"dataset is cached afterwards), or {fix}"
        ) from e


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InputError(f"--device {device!r} is not a device torch knows ({e}). Fix: use cpu, cuda or cuda:N.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device} was asked for but torch sees no CUDA device. Fix: use --device cpu.")
    if dev.type == "cuda":
        if dev.index is None:  # plain "cuda": the current device, named, so that every tensor and launch agree
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s), numbered from 0. "
                             f"Fix: use one of them (CUDA_VISIBLE_DEVICES renumbers them).")
        torch.cuda.set_device(dev)  # Triton launches on the current device, whatever its tensors' device is
    return dev


def load_eval_model(path: str, *, device: torch.device | str = "cpu", kernels: str = "torch",
                    named: str = "--checkpoint"):
    """Our GPT, in eval mode, from a staged_fast checkpoint / run folder, a HF GPT-2 folder or a hub name."""
    from ..hf import HFImportError
    from ..kernels import backend_for_head_dim, resolve_backend

    backend = resolve_backend(kernels, device)
    p = Path(path).expanduser()
    # a local path, not a hub name ('org/name'): its folder exists here (a typo there used to spend ~30 s on hub
    # retries offline before it failed)
    if str(path) == "latest" and not p.exists():
        raise InputError(f"{named} latest: 'latest' is train's --resume word (with --save_prefix); here give "
                         "the run folder (its newest checkpoint is used) or a step_<8-digit update> folder.")
    local = str(path).count("/") > 1 or str(path).startswith((".", "/", "~")) or (
        "/" in str(path) and p.parent.is_dir())
    if not p.exists() and local:
        raise InputError(
            f"{named} {path}: no such folder. Fix: check the path; give a step_<8-digit update> folder or run folder "
            f"written by staged_fast.train, or a Hugging Face GPT-2 folder (config.json + weights)."
        )
    if p.is_file():
        raise InputError(
            f"{named} {path} is a file; checkpoints are folders. Fix: pass the step_<8-digit update> folder (or its "
            f"run folder) written by staged_fast.train, or a Hugging Face GPT-2 folder (config.json + weights)."
        )
    try:
        model = load_model(p if p.exists() else str(path), kernels_backend=backend, device=device)
    except CheckpointError as e:
        raise InputError(
            f"{e} A Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin, e.g. one "
            f"written by `python -m staged_fast.export`) works too."
        ) from e
    except HFImportError as e:  # a HF folder we cannot compute exactly: its own paragraph names the fix
        raise InputError(str(e)) from e
    except Exception as e:  # hub / transformers errors come in many types
        where = "a local folder" if p.exists() else "not a local path, and loading it as a hub model name failed"
        raise InputError(
            f"could not load --checkpoint {path} ({where}): {describe(e)}. Fix: pass a staged_fast "
            f"checkpoint (step_<8-digit update> folder or run folder), or a Hugging Face GPT2LMHeadModel folder; hub "
            f"names such as 'gpt2' need network access to huggingface.co or a filled HF cache."
        ) from e
    try:
        fitted = backend_for_head_dim(kernels, backend, model.config.head_dim, log=lambda m: print(m, file=sys.stderr))
    except ValueError as e:
        raise InputError(str(e)) from None
    if fitted != backend:
        model.set_kernels(fitted)
    return model.eval()


def checkpoint_tokenizer(checkpoint: str) -> tuple[str, str]:
    """The tokenizer a checkpoint goes with, and where that was read: the one saved in its folder (an exported or
    imported HF folder), else the --tokenizer its training run used (its trainer.pt), else GPT-2 BPE."""
    folder = Path(checkpoint).expanduser()
    if any((folder / f).exists() for f in _TOKENIZER_FILES):
        return str(folder), "saved in the checkpoint folder"
    trained = training_flags(checkpoint).get("tokenizer")
    if trained:
        return str(trained), "the --tokenizer its training run used"
    return "gpt2", "the default"


def training_flags(checkpoint: str) -> dict:
    """The flags the run that wrote a staged_fast checkpoint trained with (its trainer.pt); {} for anything else."""
    folder = Path(checkpoint).expanduser()
    if not folder.is_dir():
        return {}
    try:
        return read_trainer_state(resolve_checkpoint(folder)).get("args") or {}
    except CheckpointError:
        return {}  # not a staged_fast checkpoint; loading the model says what it is


def load_eval_tokenizer(name: str | None, checkpoint: str):
    """`name` if given; else the checkpoint's own (checkpoint_tokenizer)."""
    from ..tokenizer import load_tokenizer

    where = "given"
    if name is None:
        name, where = checkpoint_tokenizer(checkpoint)
    try:
        return load_tokenizer(name)
    except ValueError as e:
        fix = "" if where in ("given", "the default") else f" (the tokenizer {where}; pass --tokenizer to use another)"
        raise InputError(f"{e}{fix}") from e


def check_out_file(path: str | None, flag: str = "--out") -> None:
    """A result file's place, checked before the work: a long evaluation used to end in a traceback there."""
    problem = None if path is None else out_file_problem(flag, str(Path(path).expanduser()), "result.json")
    if problem:
        raise InputError(problem)


def not_utf8_error(path: Path, e: UnicodeDecodeError, what: str) -> InputError:
    """The error for a data file that is not UTF-8 text (where, and how to convert it)."""
    where = ""
    try:  # the reader's offset is inside one decoding chunk: find the first bad byte in the whole file
        data = path.read_bytes()
        data.decode("utf-8")
    except UnicodeDecodeError as whole:
        line = data.count(b"\n", 0, whole.start) + 1
        where = (f" byte 0x{data[whole.start]:02x} at offset {whole.start} (line {line}) is not valid UTF-8 "
                 f"({whole.reason}).")
    except OSError:
        pass
    return InputError(
        f"--data_file {path} is not UTF-8 text:{where or ' ' + e.reason + '.'} Fix: give the {what} file as UTF-8, "
        f"e.g. `iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}` if it is Latin-1."
    )


def read_jsonl_texts(path: str | Path, *, what: str) -> list[str]:
    """The `text` field of every line of a jsonl file (blank lines skipped)."""
    return read_jsonl(path, what=what, example='{"text": "..."}', parse=_text_field)


def _text_field(row, where: str, what: str) -> str:
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        keys = ", ".join(map(repr, row)) if isinstance(row, dict) else type(row).__name__
        raise InputError(
            f"{where} has no string field 'text' (found: {keys}). Fix: the {what} file must "
            f'hold one JSON object per line with the passage under "text", like {{"text": "..."}} '
            f"(the format of OpenAI's lambada_test.jsonl)."
        )
    return row["text"]


def read_jsonl(path: str | Path, *, what: str, example: str, parse) -> list:
    """`parse(row, where, what)` of every line of a jsonl file (blank lines skipped); `example` shows a line's
    form in the messages for a missing file, a line that is not JSON, or a file without examples."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"--data_file {path}: no such file. Fix: check the path to the {what} file.")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(
                        f"{path} line {lineno} is not valid JSON ({e.msg}). Fix: the {what} file must hold one JSON "
                        f"object per line, like {example}."
                    ) from e
                rows.append(parse(row, f"{path} line {lineno}", what))
    except UnicodeDecodeError as e:
        raise not_utf8_error(path, e, what) from e
    if not rows:
        raise InputError(f"{path} holds no examples. Fix: point --data_file at a non-empty {what} file.")
    return rows


def check_vocab(model, tokenizer) -> None:
    from ..tokenizer import id_space

    n = id_space(tokenizer)
    if n > model.config.vocab_size:
        raise InputError(
            f"the tokenizer's ids reach {n - 1} but the model's vocabulary has only {model.config.vocab_size}: token "
            f"ids would fall outside the embedding table. Fix: pass --tokenizer with the tokenizer the model "
            f"was trained with."
        )


def autocast(device: torch.device, dtype: str):
    """Mixed precision for bf16/fp16 (weights stay fp32, layer norms and the loss run in fp32)."""
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def format_table(title: str, rows: list[tuple[str, object]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}" if math.isfinite(v) and abs(v) < 1e6 else f"{v:.4g}"
        return str(v)

    cells = [(k, fmt(v)) for k, v in rows]
    w0 = max(len(k) for k, _ in cells)
    w1 = max(len(v) for _, v in cells)
    line = "+" + "-" * (w0 + 2) + "+" + "-" * (w1 + 2) + "+"
    out = [title, line] + [f"| {k:<{w0}} | {v:>{w1}} |" for k, v in cells] + [line]
    return "\n".join(out)


def write_json(result: dict, path: str | None) -> None:
    if path is None:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def run_cli(main_fn, argv=None) -> int:
    """Run `main_fn(argv)`; bad input becomes `error: <message>` on stderr and exit code 2 (as train and grow)."""
    try:
        main_fn(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
