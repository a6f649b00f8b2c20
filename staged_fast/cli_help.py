"""One --help format for every command line: descriptions kept as written (their paragraphs and examples), and
each option's default shown where it tells the reader something; and `quiet_on_closed_pipe`, which ends a
command whose reader went away (`| head`) as cat would, instead of with a BrokenPipeError traceback.

argparse's ArgumentDefaultsHelpFormatter appends "(default: None)" to options whose absence means "derived
from other flags", "(default: False)" to every switch, and a second default to help text that already
explains its own ("(default: runs/<size>-<time>) (default: None)"). This one appends the value only when it
is a value (not None, False or "") and the text does not already name a default.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or (isinstance(default, str) and default in ("", argparse.SUPPRESS))
        if unset or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def quiet_on_closed_pipe(main: Callable[..., int], *args) -> int:
    """main(*args)'s exit code; 141 (128 + SIGPIPE, what a shell shows for cat) when stdout's reader closed it."""
    try:
        code = main(*args)
        sys.stdout.flush()  # a late close shows here, not in the interpreter's flush at exit
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit would raise again
        return 141
