""".txt files read in pieces that tokenize exactly as the whole file does.

A .txt file is one document. Tokenized in one call, a fast tokenizer held ~165 bytes of memory per byte of
text (its encoding's ids, offsets and token strings, then Python lists: measured 3.7 GB for a 22 MB file, so
a 200 MB file needed ~33 GB), and one thread did all the work. Instead the file is streamed in pieces of
about PIECE_CHARS characters, cut at seams where the tokenizer's output does not change:

- candidates: before a space between two non-space characters, after a newline, or between punctuation and
  a letter or digit;
- a candidate is taken when no pre-token of the tokenizer's pre-tokenizer (if it has one) straddles it, and the
  tokenizer gives the same ids for the CONTEXT characters on either side of it encoded together and as two
  halves. Regex pre-tokenizers (GPT-2, tiktoken-style, Llama 3) and whitespace ones decide where a pre-token
  ends from a few neighbouring characters, and BPE merges stay inside a pre-token, so a seam that holds in its
  window holds in the file, and the pieces' ids joined are the whole file's (tests compare them). The ids
  check alone once passed by coincidence inside a run of punctuation longer than the window ("(((...(_").

A tokenizer where no candidate holds (one that prepends a marker to every input, for instance) reads the
rest of the file as one piece, as before, with a warning about memory. A stretch with no candidate at all (a
long line without spaces) only makes its piece longer.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import TextIO

from ..tokenizer import batch_encoder

PIECE_CHARS = 8192          # ~2k GPT-2 tokens: a tokenizer batch of 1000 pieces holds ~8 MB of text
CONTEXT = 64                # characters on each side of a seam that the check encodes
READ_CHARS = 1 << 20        # characters read from the file at a time
TRIES = 8                   # candidates checked per PIECE_CHARS of text before looking further on
GIVE_UP_CHECKS = 128        # this many failed checks in a row: the tokenizer has no seams; read the rest whole
LONG_PIECE_CHARS = 1 << 24  # a piece this long (no candidate in it: one long line of hex, say) is warned of
_CANDIDATE = re.compile(r"(?<=\S)(?= \S)|(?<=\n)(?=\S)|(?<=[^\w\s])(?=[^\W_])")

logger = logging.getLogger(__name__)
SeamCheck = Callable[[str, str], bool]


def seam_check(tokenizer) -> SeamCheck:
    """holds(left, right): does a pre-token end between left and right (where the tokenizer pre-tokenizes), and
    does the tokenizer give left + right the ids of left followed by those of right?"""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre_tokenizer = getattr(backend, "pre_tokenizer", None)
    ids_of = batch_encoder(tokenizer)  # what the corpus is tokenized with

    def holds(left: str, right: str) -> bool:
        if pre_tokenizer is not None:  # no pre-token may straddle the seam (a dropped space between is fine)
            seam = len(left)
            if any(start < seam < end for _, (start, end) in pre_tokenizer.pre_tokenize_str(left + right)):
                return False
        whole, head, tail = ids_of([left + right, left, right])
        return whole == head + tail
    return holds


def _seam(text: str, lo: int, hi: int, holds: SeamCheck) -> tuple[int | None, int]:
    """(the first candidate in text[lo:hi] that holds, or None; how many failed), checking at most TRIES."""
    failed = 0
    for match in _CANDIDATE.finditer(text, lo, hi):
        if failed == TRIES:
            break
        i = match.start()
        if holds(text[max(i - CONTEXT, 0):i], text[i:i + CONTEXT]):
            return i, failed
        failed += 1
    return None, failed


def text_pieces(f: TextIO, holds: SeamCheck, name: str = "") -> Iterator[str]:
    """The text of `f` in pieces whose tokenizations joined are the whole text's: each runs from PIECE_CHARS
    characters to the first seam that holds after them (within 2 x PIECE_CHARS where the text has one); the
    last may be shorter; empty text yields nothing."""
    buf, pos, eof = "", 0, False   # the next piece starts at buf[pos]
    search = PIECE_CHARS           # seams are looked for in buf[pos + search : pos + search + PIECE_CHARS]
    failed = 0                     # checks failed since the last seam that held
    while True:
        lo = pos + search
        if not eof and len(buf) < lo + PIECE_CHARS + CONTEXT:
            block = f.read(READ_CHARS)
            eof = not block
            buf, pos = buf[pos:] + block, 0
            continue
        if len(buf) <= lo + PIECE_CHARS:  # at the end of the file: the rest is one piece
            if pos < len(buf):
                yield buf[pos:]
            return
        cut, misses = _seam(buf, lo, lo + PIECE_CHARS, holds)
        failed = 0 if cut is not None else failed + misses
        if cut is not None:
            yield buf[pos:cut]
            pos, search = cut, PIECE_CHARS
        elif failed < GIVE_UP_CHECKS:
            search += PIECE_CHARS
            if search == LONG_PIECE_CHARS:
                logger.warning("data: %s has %d characters in a row with no place to cut them (no space, newline or "
                               "punctuation before a word), so they are tokenized in one piece (~165 bytes of memory "
                               "per character). Fix, if memory runs out: break its lines.", name or "a .txt file",
                               LONG_PIECE_CHARS)
        else:
            logger.warning("data: the tokenizer changes its output at each of %d places tried in a row in %s, so "
                           "the rest of the file is tokenized in one piece (~165 bytes of memory per byte of "
                           "text). Fix, if memory runs out: split the file into several documents (.jsonl).",
                           failed, name or "a .txt file")
            yield buf[pos:] + f.read()
            return
