"""benchmarks/staged_sweep.py: the sweep end to end at a toy size (one seed, 2 direct LRs, width growth by
the plan: 3 training subprocesses), that it resumes (a repeated command trains nothing) and that
--analyze_only rebuilds the same numbers; the equal-FLOPs interpolation and mean +/- sd on known values."""
from __future__ import annotations

import json
import math

from benchmarks import staged_sweep as sweep

ARGS = ["--quick", "--train_steps", "40", "--seeds", "1", "--lrs", "2e-3,4e-3", "--ops", "width",
        "--strategies", "plan"]


def test_loss_at_flops_interpolates_in_log_flops():
    points = [dict(flops=1e9, val_loss=5.0), dict(flops=1e11, val_loss=4.0)]
    assert math.isclose(sweep.loss_at_flops(points, 1e10), 4.5)
    assert sweep.loss_at_flops(points, 1e12) is None
    assert sweep.mean_sd([0.1, 0.3, None]) == (0.2, math.sqrt(0.02))


def test_sweep_runs_resumes_and_reanalyzes(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert sweep.main([*ARGS, "--out", str(out)]) == 0
    first = json.loads((out / "sweep.json").read_text())
    assert (out / "sweep.png").stat().st_size > 0 and "mean +/- sd" in (out / "sweep.md").read_text()
    for seed in ("1",):
        entry = first["seeds"][seed]
        assert entry["tuned_lr"] in (2e-3, 4e-3)
        assert entry["tuned_lr"] == min((0.002, 0.004), key=lambda lr: entry["direct_final_loss"][f"{lr:g}"])
        run = entry["runs"]["width_plan"]
        assert run["growth"]["new_size"].startswith("2L/128d")  # tiny_div2_width grew to tiny
        assert run["final_loss_diff_at_equal_flops"] is not None
    assert set(first["loads"]) == {f"seed1/{r}" for r in ("direct_lr0.002", "direct_lr0.004", "staged_width_plan")}
    assert first["summary"]["width_plan"]["flops_saving"]["sd"] in (0.0, None)  # one seed
    capsys.readouterr()
    assert sweep.main([*ARGS, "--out", str(out)]) == 0  # the same command again: every run is finished
    assert capsys.readouterr().out.count("finished earlier, reused") == 3
    assert sweep.main([*ARGS, "--out", str(out), "--analyze_only"]) == 0
    again = json.loads((out / "sweep.json").read_text())
    assert again["summary"] == first["summary"]


def test_data_that_cannot_carry_the_gpu_sweep_is_refused_and_the_named_fix_works(small_vocab):
    """--gpu reads 24.6M tokens per run: on the bundled corpus (1.6M) that was ~15 epochs (the direct runs
    overfit, and their final loss picks L* and the LR), and seeds whose held-out documents fill fewer than
    one validation batch stopped the whole sweep at the first validation. Both are refused before any run,
    and the fixes the message names are enough."""
    import re

    import pytest

    tokenizer, cache = small_vocab
    gpu = dict(sweep.MODES["gpu"])
    with pytest.raises(SystemExit) as refused:
        sweep.check_data(gpu, tokenizer, None, 0.01, cache, [1, 2])
    msg = str(refused.value)
    assert "epochs" in msg and re.search(r"--data with a corpus of at least 2\dM tokens", msg), msg
    assert "fewer than --val_batches 8 x batch 32" in msg, msg
    steps = int(re.search(r"--train_steps (\d+) or fewer", msg).group(1))  # with the validation share named
    share = float(re.search(r"--val_fraction ([\d.]+)", msg).group(1))
    sweep.check_data(dict(gpu, train_steps=steps), tokenizer, None, share, cache, [1, 2])
    sweep.check_data(dict(sweep.MODES["full"]), tokenizer, None, 0.01, cache, [1, 2, 3])  # the CPU sweep's data holds
