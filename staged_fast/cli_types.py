"""What the command lines check of their flags' values before any work. argparse types for numbers with a meaning
only in a range: a bad value is argparse's one-line error (exit 2) naming the flag; `float` alone takes 'nan' and
'inf', which then failed deep inside (torch's normal, multinomial, AdamW) or trained silently on NaN. And whether
a result file can be written where a flag says."""
from __future__ import annotations

import argparse
import math
import os


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _ranged(parse, ok, must: str):
    """An argparse type: `parse` the text, then refuse a value for which `ok` is false, saying what it `must` be."""
    def check(text: str):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} {must}")
        return value
    return check


finite_float = _ranged(_number, lambda v: True, "")
non_negative_float = _ranged(_number, lambda v: v >= 0, "is negative; it must be 0 or more")
positive_float = _ranged(_number, lambda v: v > 0, "must be greater than 0")
fraction = _ranged(_number, lambda v: 0 <= v <= 1, "is outside [0, 1]")  # a share of something (0: none of it)
unit_interval = _ranged(_number, lambda v: 0 <= v < 1, "is outside [0, 1)")  # a probability of dropping, a beta
non_negative_int = _ranged(_integer, lambda v: v >= 0, "is negative; it must be 0 or more")
positive_int = _ranged(_integer, lambda v: v >= 1, "must be an integer of 1 or more")


def out_file_problem(flag: str, path: str, example: str) -> str | None:
    """What keeps `path` from being written as a result file, checked before the work (a long evaluation or plan
    used to end in a traceback there), or None. A missing folder above it is made when it is written."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        return (f"{flag} {path} is a folder; it must name a file to write (e.g. {flag} "
                f"{os.path.join(path, example)}).")
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{flag} {path} cannot be written: {existing} is a file, not a folder. Choose another {flag}."
    target, mode = (path, os.W_OK) if os.path.exists(path) else (existing, os.W_OK | os.X_OK)
    if not os.access(target, mode):
        return (f"{flag} {path} is not writable: this user cannot write {target} (read-only filesystem or "
                f"permissions). Choose a path you can write to, or fix its permissions.")
    return None
