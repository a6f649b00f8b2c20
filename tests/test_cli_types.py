"""Numbers out of their range (NaN and infinities included) are argparse errors naming the flag, exit 2, before
any work: `type=float` took 'nan', which then failed deep inside torch or trained silently on NaN."""
import pytest

from staged_fast import grow, sample, train_args

GROW = ["ckpt", "--op", "width", "--out", "o"]


@pytest.mark.parametrize("parser, argv, said", [
    (train_args.build_parser, ["--grad_clip", "nan"], "--grad_clip: 'nan' is not a finite number"),
    (train_args.build_parser, ["--width_noise", "inf"], "--width_noise: 'inf' is not a finite number"),
    (train_args.build_parser, ["--weight_decay", "-0.1"], "--weight_decay: -0.1 is negative"),
    (train_args.build_parser, ["--min_lr=-1e-5"], "--min_lr: -1e-5 is negative"),
    (train_args.build_parser, ["--adam_beta2", "1"], "--adam_beta2: 1 is outside [0, 1)"),
    (train_args.build_parser, ["--adam_eps", "0"], "--adam_eps: 0 must be greater than 0"),
    (train_args.build_parser, ["--val_fraction", "1.5"], "--val_fraction: 1.5 is outside [0, 1)"),
    (train_args.build_parser, ["--rope_theta", "abc"], "--rope_theta: 'abc' is not a number"),
    (grow.build_parser, [*GROW, "--width_noise", "nan"], "--width_noise: 'nan' is not a finite number"),
    (grow.build_parser, [*GROW, "--optimizer_step", "-5"], "--optimizer_step: -5 is negative"),
    (sample.build_parser, ["--checkpoint", "c", "--temperature", "nan"], "--temperature: 'nan' is not a finite"),
    (sample.build_parser, ["--checkpoint", "c", "--top_p", "inf"], "--top_p: 'inf' is not a finite number"),
])
def test_bad_numbers_are_refused_naming_the_flag(parser, argv, said, capsys):
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(argv)
    assert exit_.value.code == 2
    assert said in capsys.readouterr().err


def test_values_in_range_pass_through():
    args = train_args.build_parser().parse_args(["--grad_clip", "0", "--adam_beta1", "0", "--min_lr", "1e-5"])
    assert (args.grad_clip, args.adam_beta1, args.min_lr) == (0.0, 0.0, 1e-5)
    assert grow.build_parser().parse_args([*GROW, "--optimizer_step", "0"]).optimizer_step == 0
