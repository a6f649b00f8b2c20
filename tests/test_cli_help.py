"""--help of every command line: each option's default shown once where it is a value, never "(default: None)",
"(default: False)" or a second default after help text that names its own; descriptions keep their lines."""
import re

import pytest

from staged_fast import export, grow, sample, train_args
from staged_fast.evaluate import __main__ as evaluate_cli
from staged_fast.schedule import __main__ as schedule_cli

# (parser builder, argv before --help)
COMMANDS = {
    "train": (train_args.build_parser, []),
    "grow": (grow.build_parser, []),
    "export": (export.build_parser, []),
    "sample": (sample.build_parser, []),
    "evaluate": (evaluate_cli.build_parser, []),
    "evaluate wikitext": (evaluate_cli.build_parser, ["wikitext"]),
    "evaluate hellaswag": (evaluate_cli.build_parser, ["hellaswag"]),
    "schedule": (schedule_cli.build_parser, []),
    "schedule plan": (schedule_cli.build_parser, ["plan"]),
    "schedule analyze": (schedule_cli.build_parser, ["analyze"]),
}


def _help(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")  # argparse wraps to the terminal; one width for every run
    build, argv = COMMANDS[name]
    with pytest.raises(SystemExit) as exit_info:
        build().parse_args([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _options(text):
    """Each option's help, joined onto one line (entries start with two spaces and a dash)."""
    body = text.split("options:", 1)[1]
    return [" ".join(entry.split()) for entry in re.split(r"\n  (?=-)", body)[1:]]


@pytest.mark.parametrize("name", COMMANDS)
def test_each_default_is_shown_once_and_only_where_it_is_a_value(name, capsys, monkeypatch):
    text = _help(name, capsys, monkeypatch)
    for empty in ("(default: None)", "(default: False)", "(default: )"):
        assert empty not in text, (name, empty)
    for entry in _options(text):
        assert entry.lower().count("default") <= 1, entry


@pytest.mark.parametrize("name, shown", [
    ("train", "--seed SEED seeds init, data order and dropout (default: 1234)"),
    ("train", "else runs/<size>-<time>)"),  # the help's own, without argparse's "(default: None)" after it
    ("grow", "--width_noise WIDTH_NOISE std of E"),
    ("grow", "(default: alternate_id)"),
    ("sample", "tokens to generate per sample (default: 100)"),  # was shown no default at all
    ("evaluate wikitext", "(default: 8)"),
    ("schedule plan", "(default: 0.1)"),
])
def test_values_are_shown(name, shown, capsys, monkeypatch):
    assert shown in " ".join(_help(name, capsys, monkeypatch).split())


def test_descriptions_keep_their_lines(capsys, monkeypatch):
    text = _help("sample", capsys, monkeypatch)
    first = sample.__doc__.strip().splitlines()[0]
    assert f"\n{first}\n" in text  # not reflowed into the next paragraph
