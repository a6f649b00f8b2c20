"""Schedule: scaling law, slope rule on the authors' real curves, planner, online trigger, CLI."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from staged_fast.config import ConfigError, preset_config
from staged_fast.schedule import (THRESHOLDS, Plan, SlopeTrigger, analyze_logs, compute, constant_op,
                                  critical_batch, find_threshold_index, loss_scaling_law, loss_slope,
                                  optimality_step, plan_for_run, plan_stages, read_curve, slope_curve,
                                  steps_to_loss, threshold_for)
from staged_fast.schedule.__main__ import main

LOGS = os.path.join(os.path.dirname(__file__), "data", "staged_training_logs")
B = 512 * 1024


# ------------------------------------------------------------------------------------- scaling law
def test_scaling_law_hand_computed():
    # L(N, S) = (Nc/N)^aN + (2 Sc/S)^aS with Nc=8.8e13, aN=0.076, Sc=2.1e3, aS=0.76
    assert loss_scaling_law(1e8, 1e4) == pytest.approx(880000.0**0.076 + 0.42**0.76, rel=1e-12)
    # by hand: exp(0.076 * ln 880000) = exp(1.040264) = 2.82996; exp(0.76 * ln 0.42) = exp(-0.659301) = 0.51721
    assert loss_scaling_law(1e8, 1e4) == pytest.approx(2.82996 + 0.51721, abs=2e-5)
    assert critical_batch(3.0) == pytest.approx(2.1e8 / 3.0 ** (1 / 0.21), rel=1e-12)
    assert critical_batch(1.0) == pytest.approx(2.1e8)
    assert compute(1e8, 524288, 1000) == 6 * 1e8 * 524288 * 1000
    assert compute(84_934_656, B, 5249) == pytest.approx(1.4024347778e18, rel=1e-9)


def test_scaling_law_inverse_and_slope():
    n = preset_config("GPT2_large").n_params_non_embedding
    for s in (1e3, 1e4, 1e5):
        assert steps_to_loss(n, loss_scaling_law(n, s)) == pytest.approx(s, rel=1e-9)
    # analytic d log L / d log S against a central difference
    s, h = 2e4, 1e-4
    numeric = (math.log(loss_scaling_law(n, s * math.exp(h))) - math.log(loss_scaling_law(n, s * math.exp(-h)))) / (2 * h)
    assert loss_slope(n, s) == pytest.approx(numeric, rel=1e-6)
    s_opt = optimality_step(n)
    assert loss_slope(n, s_opt) == pytest.approx(-0.052, rel=1e-9)
    with pytest.raises(ValueError, match="never reaches"):
        steps_to_loss(n, 1.0)


# ----------------------------------------------------------------------------------- constants, ops
def test_thresholds_and_constants():
    assert THRESHOLDS["optimality"] == -0.052 and THRESHOLDS["width"] == -0.0475
    assert THRESHOLDS["depth"] == -0.0575 and THRESHOLDS["depth+width"] == -0.03
    for op in ("alternate_id", "append_id", "alternate_copy", "append_copy"):
        assert THRESHOLDS[op] == threshold_for(op) == -0.0575
        assert constant_op(op) == 1.412
    assert constant_op("width") == 1.776 and constant_op("depth+width") == 2.455
    with pytest.raises(ValueError, match="Unknown growth operator"):
        constant_op("deeper")


# ------------------------------------------------------------------------------- real-curve analysis
# What the rule finds on the authors' curves (computed by this code, not tuned): see docs/schedule.md.
EXPECTED = {  # small: (S_grow, R, S_opt literal, S_opt smooth_x, saving literal, saving smooth_x)
    "GPT2_base_div2_width": (3949, 2149, 5249, 5249, 0.2213, 0.2213),
    "GPT2_base_div2_depth": (3049, 2249, 5249, 5249, 0.1380, 0.1380),
    "GPT2_large_div2_width": (6449, 3699, 2549, 7899, None, 0.2642),
    "GPT2_large_div2_depth": (6949, 4749, 2549, 7899, None, 0.1613),
}


@pytest.fixture(scope="module")
def results():
    return {sx: analyze_logs(LOGS, smooth_x=sx) for sx in (False, True)}


@pytest.mark.parametrize("smooth_x", [False, True])
def test_pair_analysis_consistent(results, smooth_x):
    for r in results[smooth_x]:
        small, target = read_curve(os.path.join(LOGS, r.small + ".csv")), read_curve(os.path.join(LOGS, r.target + ".csv"))
        assert small.steps[0] <= r.grow_step <= small.steps[-1]
        assert target.steps[0] <= r.restart_step <= target.steps[-1]
        t = slope_curve(target, r.target_params, B, smooth_x=smooth_x)
        i = int(np.nonzero(t.steps == r.restart_step)[0][0])
        assert t.loss[i] <= r.grow_loss < t.loss[i - 1]  # first equal-loss point
        assert r.measured_constant == pytest.approx(r.grow_step / r.restart_step)
        assert r.direct_compute == pytest.approx(6 * r.target_params * B * r.opt_step)
        if r.saving is not None:
            staged = 6 * B * (r.small_params * r.grow_step + r.target_params * (r.opt_step - r.restart_step))
            assert r.staged_compute == pytest.approx(staged)
            assert r.saving == pytest.approx(1 - staged / r.direct_compute)
        else:
            assert r.restart_step >= r.opt_step and "R >= S_opt" in r.note


@pytest.mark.parametrize("smooth_x", [False, True])
def test_pair_analysis_values(results, smooth_x):
    for r in results[smooth_x]:
        s_grow, restart, opt_lit, opt_sx, sav_lit, sav_sx = EXPECTED[r.small]
        assert (r.grow_step, r.restart_step) == (s_grow, restart)
        assert r.opt_step == (opt_sx if smooth_x else opt_lit)
        expected = sav_sx if smooth_x else sav_lit
        assert r.saving == (None if expected is None else pytest.approx(expected, abs=5e-4))
        assert r.saving is None or r.saving > 0


def test_online_trigger_matches_offline_on_real_curves():
    for name in ("GPT2_base", "GPT2_base_div2_width", "GPT2_base_div2_depth", "GPT2_large",
                 "GPT2_large_div2_width", "GPT2_large_div2_depth"):
        curve, n = read_curve(os.path.join(LOGS, name + ".csv")), preset_config(name).n_params_non_embedding
        for smooth_x in (False, True):
            for th in (-0.052, -0.0575, -0.0475, -0.03):
                i = find_threshold_index(slope_curve(curve, n, B, smooth_x=smooth_x), th)
                offline = None if i is None else slope_curve(curve, n, B, smooth_x=smooth_x).steps[i]
                trig = SlopeTrigger(th, n_params=n, batch_tokens=B, smooth_x=smooth_x)
                fired = [s for s, v in zip(curve.steps, curve.loss) if trig.update(s, v)]
                assert fired == ([] if offline is None else [offline]), (name, smooth_x, th)


# --------------------------------------------------------------------------------- synthetic trigger
def _knee_curve(knee: int, n_points: int = 60):
    """log10 L piecewise linear in log10 step: slope -0.3 over intervals 1..knee, -0.01 after.
    Steps are geometric, so the smoothed slope at point i is the mean of intervals i-4..i: the first point
    whose 5 intervals are all flat is i = knee + 5, the only point with slope > -0.052 after the steepest."""
    steps = 100.0 * 1.1 ** np.arange(n_points)
    inc = np.where(np.arange(1, n_points) <= knee, -0.3, -0.01) * np.log10(1.1)
    log_l = np.log10(6.0) + np.concatenate([[0.0], np.cumsum(inc)])
    return steps, 10.0**log_l


@pytest.mark.parametrize("knee", [10, 23])
def test_trigger_fires_at_known_step(knee):
    steps, loss = _knee_curve(knee)
    for n_params in (1e6, 7e8):  # N and B cancel in d log L / d log C
        trig = SlopeTrigger(-0.052, window=5, n_params=n_params, batch_tokens=B)
        fired = [s for s, v in zip(steps, loss) if trig.update(s, v)]
        assert fired == [steps[knee + 5]]
    # a spike (> 1% above the last kept point) between two points is dropped: same answer
    trig = SlopeTrigger(-0.052, n_params=1e6)
    fired = []
    for j, (s, v) in enumerate(zip(steps, loss)):
        if j == knee + 2:
            assert trig.update(s - 1.0, loss[j - 1] * 1.05) is False
        if trig.update(s, v):
            fired.append(s)
    assert fired == [steps[knee + 5]]
    # fires once; after reset (growth) the new curve is watched afresh
    trig.reset(4e6)
    assert [s for s, v in zip(steps, loss) if trig.update(s, v)] == [steps[knee + 5]]


def test_trigger_rejects_bad_input():
    trig = SlopeTrigger(-0.05, n_params=1e6)
    trig.update(10, 5.0)
    with pytest.raises(ValueError, match="increase"):
        trig.update(10, 4.9)
    with pytest.raises(ValueError):
        SlopeTrigger(0.01, n_params=1e6)


# ----------------------------------------------------------------------------------------- planner
@pytest.mark.parametrize("op,start", [("width", "GPT2_large_div2_width"), ("depth", "GPT2_large_div2_depth")])
def test_planner_gpt2_large(op, start):
    plan = plan_stages("GPT2_large", [op])
    s0, s1 = plan.stages
    assert s0.preset == start and s1.preset == "GPT2_large"
    assert s0.grow_op_after == ("width" if op == "width" else "alternate_id") and s1.grow_op_after is None
    assert 0 < plan.predicted_saving < 0.5
    assert plan.total_compute < plan.direct_compute
    assert plan.total_compute == pytest.approx(sum(s.compute for s in plan.stages))
    assert s1.loss_end == pytest.approx(plan.target_loss, rel=1e-6)
    assert plan.target_loss == pytest.approx(loss_scaling_law(s1.n_params, optimality_step(s1.n_params)))
    assert s0.restart_step == round(s0.steps / constant_op(op)) == s1.start_step
    assert s1.run_step_start == s0.steps and s0.restart_warmup >= 1
    # optimal: moving the growth point either way costs more (the last stage re-solved to the same loss)
    n0, n1 = s0.n_params, s1.n_params
    s_t = steps_to_loss(n1, plan.target_loss)

    def cost(x):
        return n0 * x + n1 * (s_t - steps_to_loss(n1, loss_scaling_law(n0, x)))

    best = cost(plan.law_stage_steps[0])
    assert best < cost(plan.law_stage_steps[0] * 1.1) and best < cost(plan.law_stage_steps[0] * 0.9)


def test_planner_multi_stage_and_errors():
    plan = plan_stages("GPT2_large", ["width", "width"])
    assert [s.preset for s in plan.stages] == ["GPT2_large_div4_width", "GPT2_large_div2_width", "GPT2_large"]
    assert plan.predicted_saving > plan_stages("GPT2_large", ["width"]).predicted_saving > 0
    assert plan.stages[1].start_step == plan.stages[0].restart_step
    assert plan.stages[1].restart_step == round(plan.stages[1].end_step / 1.776)
    with pytest.raises(ConfigError, match="Unknown model size"):
        plan_stages("GPT2_xl", ["width"])
    with pytest.raises(ConfigError, match="Unknown growth operator"):
        plan_stages("GPT2_large", ["deeper"])
    with pytest.raises(ConfigError, match="halve the depth"):
        plan_stages("tiny_div2_depth", ["depth"])


def test_plan_for_run_and_json_round_trip(tmp_path):
    plan = plan_for_run("tiny", ["width", "depth"], 300)
    assert plan.train_steps == 300 == plan.scaled_to_train_steps
    fractions = np.array([s.steps for s in plan.stages]) / 300
    law = np.array(plan.law_stage_steps) / sum(plan.law_stage_steps)
    assert np.allclose(fractions, law, atol=1 / 300)
    assert plan.predicted_saving == pytest.approx(plan_stages("tiny", ["width", "depth"]).predicted_saving)
    d = json.loads(plan.to_json())
    assert d["format"] == "staged_fast.plan/1" and d["train_steps"] == 300
    g = d["growths"]
    assert [x["at_run_step"] for x in g] == [plan.stages[0].steps, plan.stages[0].steps + plan.stages[1].steps]
    assert [x["op"] for x in g] == ["width", "alternate_id"]
    assert g[1]["at_schedule_step"] == plan.stages[0].restart_step + plan.stages[1].steps
    assert g[1]["restart_step"] == round(g[1]["at_schedule_step"] / 1.412)
    assert Plan.from_json(plan.to_json()) == plan
    path = str(tmp_path / "plan.json")
    plan.to_json(path)
    assert Plan.from_json(path) == plan
    with pytest.raises(ValueError, match="not a staged_fast plan"):
        Plan.from_dict({"format": "other"})


# --------------------------------------------------------------------------------------------- CLI
def test_cli_analyze(capsys, tmp_path):
    out = str(tmp_path / "a.json")
    assert main(["analyze", "--logs", LOGS, "--json", out]) == 0
    text = capsys.readouterr().out
    assert "GPT2_base_div2_width -> GPT2_base" in text and "22.1%" in text
    assert len(json.load(open(out))) == 4
    assert main(["analyze", os.path.join(LOGS, "GPT2_base_div2_depth.csv"), os.path.join(LOGS, "GPT2_base.csv"),
                 "--op", "depth"]) == 0
    assert "13.8%" in capsys.readouterr().out
    assert main(["analyze", os.path.join(LOGS, "GPT2_base.csv"), os.path.join(LOGS, "GPT2_base_div2_depth.csv"),
                 "--op", "depth"]) == 2  # swapped: it printed n/a and -456.8%
    assert "is not smaller than the target" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("step,loss\n1,2\n")
    assert main(["analyze", str(bad), str(bad), "--op", "width", "--small_params", "10",
                 "--target_params", "20"]) == 2
    assert "missing column" in capsys.readouterr().err


def test_cli_plan_and_law(capsys, tmp_path):
    out, png = str(tmp_path / "plan.json"), str(tmp_path / "plan.png")
    assert main(["plan", "--target", "GPT2_large", "--ops", "width", "--out", out, "--plot", png]) == 0
    assert "predicted saving" in capsys.readouterr().out
    assert Plan.from_json(out).stages[-1].preset == "GPT2_large"
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["plan", "--target", "nope"]) == 2
    assert "Unknown model size" in capsys.readouterr().err
    assert main(["law", "--target", "GPT2_base", "--steps", "10000"]) == 0
    text = capsys.readouterr().out
    assert f"{loss_scaling_law(84_934_656, 10000):.4f}" in text


def test_cli_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "staged_fast.schedule", "law", "--n_params", "1e8"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "optimality" in r.stdout


# ------------------------------------------------------------------------------ CLI: bad input, exit 2
def _usage_error(capsys, argv) -> str:
    """argparse refuses argv (exit 2, no traceback); returns its stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_cli_output_paths_checked_before_the_work(capsys, tmp_path, monkeypatch):
    import staged_fast.schedule.__main__ as cli

    def no_work(*a, **k):
        raise AssertionError("the work ran before the output path was checked")

    monkeypatch.setattr(cli, "plan_for_run", no_work)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for argv, words in [
        (["--out", str(tmp_path)], ["--out", "is a folder", "plan.json"]),
        (["--out", str(tmp_path) + "/"], ["--out", "is a folder"]),
        (["--plot", str(tmp_path)], ["--plot", "is a folder"]),
        (["--out", str(a_file / "plan.json")], ["--out", "is a file, not a folder"]),
        (["--plot", str(tmp_path / "plan.txt")], ["--plot", ".txt", ".png"]),
        (["--out", str(tmp_path / "p.png"), "--plot", str(tmp_path / "p.png")], ["--out and --plot"]),
    ]:
        assert main(["plan", "--target", "tiny", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        assert all(w in err for w in words), (argv, err)
    monkeypatch.setattr(cli.os, "access", lambda *a, **k: False)  # as a read-only folder (root ignores modes)
    assert main(["plan", "--target", "tiny", "--out", str(tmp_path / "plan.json")]) == 2
    assert "not writable" in capsys.readouterr().err
    monkeypatch.undo()
    # a missing folder above --out is created (as `staged_fast.evaluate --out` does)
    out, png = tmp_path / "new" / "dir" / "plan.json", tmp_path / "new" / "plots" / "plan.png"
    assert main(["plan", "--target", "tiny", "--out", str(out), "--plot", str(png)]) == 0
    assert Plan.from_json(str(out)).stages[-1].preset == "tiny" and png.read_bytes()[:4] == b"\x89PNG"
    # analyze --json: refused before the curves are read
    monkeypatch.setattr(cli, "analyze_logs", no_work)
    assert main(["analyze", "--logs", LOGS, "--json", str(tmp_path)]) == 2
    assert "--json" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["5", "-1", "1.5", "nan", "inf"])
def test_cli_restart_warmup_frac_range(capsys, value):
    err = _usage_error(capsys, ["plan", "--target", "tiny", f"--restart_warmup_frac={value}"])
    assert "--restart_warmup_frac" in err and ("[0, 1]" in err or "finite" in err)
    with pytest.raises(ConfigError, match=r"restart_warmup_frac must be in \[0, 1\]"):
        plan_stages("tiny", ["width"], restart_warmup_frac=float(value))


def test_restart_warmup_frac_ends():
    none, full = (plan_for_run("tiny", ["width"], 300, restart_warmup_frac=f) for f in (0.0, 1.0))
    assert none.stages[0].restart_warmup == 0  # 0 means no re-warmup, not one step
    assert full.stages[0].restart_warmup == full.stages[1].steps


@pytest.mark.parametrize("flag,value", [("--window", "0"), ("--window", "-3"), ("--batch_tokens", "0"),
                                        ("--small_params", "-5"), ("--target_params", "0")])
def test_cli_analyze_numeric_flags(capsys, flag, value):
    pair = [os.path.join(LOGS, "GPT2_base_div2_width.csv"), os.path.join(LOGS, "GPT2_base.csv"), "--op", "width"]
    err = _usage_error(capsys, ["analyze", *pair, f"{flag}={value}"])
    assert f"argument {flag}" in err and "1 or more" in err


def test_analyze_pair_checks_window_and_sizes():
    from staged_fast.schedule import analyze_pair

    small, target = (read_curve(os.path.join(LOGS, n + ".csv")) for n in ("GPT2_base_div2_width", "GPT2_base"))
    with pytest.raises(ValueError, match="window must be"):
        analyze_pair(small, target, "width", 1e7, 4e7, window=0)
    with pytest.raises(ValueError, match="batch_tokens must be"):
        analyze_pair(small, target, "width", 1e7, 4e7, batch_tokens=0)
    with pytest.raises(ValueError, match="small_params must be"):
        analyze_pair(small, target, "width", -1.0, 4e7)
    # the authors' centred window cannot be longer than the curve (it gave a silent answer)
    with pytest.raises(ValueError, match="points after spike removal"):
        analyze_pair(small, target, "width", 1e7, 4e7, window=100_000, rule="authors")


def test_batch_tokens_one_check_for_plan_and_law(capsys):
    from staged_fast.schedule import law_summary

    errs = [_usage_error(capsys, [cmd, "--target", "tiny", "--batch_tokens", "0"]) for cmd in ("plan", "law")]
    assert all("argument --batch_tokens: 0 must be an integer of 1 or more" in e for e in errs)
    with pytest.raises(ValueError) as plan_err:
        plan_stages("tiny", ["width"], batch_tokens=0)
    with pytest.raises(ValueError) as law_err:
        law_summary(1e8, 1e4, batch_tokens=0)
    assert str(plan_err.value) == str(law_err.value) == "batch_tokens must be a finite number > 0, got 0."


@pytest.mark.parametrize("argv", [["law", "--n_params", "inf"], ["law", "--n_params", "nan"],
                                  ["law", "--n_params=-1"], ["law", "--steps", "inf"], ["law", "--steps", "0"],
                                  ["plan", "--train_steps", "0"], ["plan", "--n_layer", "0", "--n_embd", "128",
                                                                   "--n_head", "2"]])
def test_cli_plan_law_numeric_flags(capsys, argv):
    err = _usage_error(capsys, argv)
    flag = next(a.split("=")[0] for a in argv if a.startswith("--"))
    assert f"argument {flag}" in err


def test_cli_help_lists_every_preset(capsys):
    import re

    from staged_fast.config import LLAMA_PRESETS, PRESETS

    for cmd in ("plan", "law"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        words = set(re.findall(r"\w+", capsys.readouterr().out))
        assert set(PRESETS) | set(LLAMA_PRESETS) <= words, cmd
    assert main(["plan", "--target", "llama_large", "--ops", "width", "width"]) == 0
    assert "llama_large_div4_width" in capsys.readouterr().out
