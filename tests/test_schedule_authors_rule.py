"""`schedule analyze --rule authors`: the authors' offline analysis of their curves, reproduced exactly.

The reference below is computed independently of staged_fast (csv + numpy + scipy, written the way the
authors' notebook is), and the published numbers are the authors' own printout.
"""
import csv
import math
import os

import numpy as np
import pytest
from scipy.ndimage import uniform_filter1d

from staged_fast.schedule import analyze_logs, analyze_pair, read_curve
from staged_fast.schedule.__main__ import main
from staged_fast.schedule.slope import Curve, authors_curve, authors_restart_index, authors_threshold_index

LOGS = os.path.join(os.path.dirname(__file__), "data", "staged_training_logs")
B = 512 * 1024
PAIRS = [("GPT2_base_div2_width", "GPT2_base", -0.0475), ("GPT2_base_div2_depth", "GPT2_base", -0.0575),
         ("GPT2_large_div2_width", "GPT2_large", -0.0475), ("GPT2_large_div2_depth", "GPT2_large", -0.0575)]
SHAPE = {"GPT2_base": (12, 768), "GPT2_base_div2_width": (12, 384), "GPT2_base_div2_depth": (6, 768),
         "GPT2_large": (24, 1536), "GPT2_large_div2_width": (24, 768), "GPT2_large_div2_depth": (12, 1536)}

# The authors' notebook (allenai/staged-training, notebooks/remove_oracle.ipynb, its printed output) on
# these curves: saving (rounded to 3 places), S_grow, R, S_opt. Their GPT2_base_div4 / GPT2_large_div4 are
# our *_div2_width presets (12L/384d, 24L/768d).
PUBLISHED = {
    "GPT2_base_div2_width": (0.216, 3799, 2049, 5099),
    "GPT2_base_div2_depth": (0.132, 2949, 2149, 5099),
    "GPT2_large_div2_width": (0.255, 6299, 3549, 7749),
    "GPT2_large_div2_depth": (0.148, 6799, 4549, 7749),
}


# ------------------------------------------------------------- independent reference (notebook-style)
def _ref_logs(name):
    """steps, losses after the notebook's spike removal, and compute = 6 N tokens."""
    with open(os.path.join(LOGS, name + ".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    prev, steps, losses = 100000.0, [], []
    for r in rows:
        step, loss = float(r["Step"]), float(r["Value"])
        if loss > prev and (loss - prev) / prev > 0.01:
            continue
        prev = loss
        steps.append(step)
        losses.append(loss)
    n_layer, d = SHAPE[name]
    n = n_layer * (d * 4 * d + d * d * 4 * 2)
    return steps, losses, [6 * n * s * B for s in steps]


def _ref_index(compute, losses, threshold):
    x = np.log10(compute)
    y = uniform_filter1d(np.log10(losses), size=5)
    first_derivative = (y[1:] - y[:-1]) / (x[1:] - x[:-1])
    k_min = int(np.where(first_derivative == first_derivative.min())[0][0])
    for i, v in enumerate(first_derivative[k_min:]):
        if v > threshold:
            return k_min + i
    raise AssertionError("no crossing")


def _reference(small, target, threshold):
    s_steps, s_loss, s_comp = _ref_logs(small)
    t_steps, t_loss, t_comp = _ref_logs(target)
    g = _ref_index(s_comp, s_loss, threshold)
    o = _ref_index(t_comp, t_loss, -0.052)
    r = min(enumerate(t_loss), key=lambda kv: abs(kv[1] - s_loss[g]))[0]
    saving = (t_comp[r] - s_comp[g]) / t_comp[o]
    return {"grow_step": s_steps[g], "grow_loss": s_loss[g], "restart_step": t_steps[r], "opt_step": t_steps[o],
            "opt_loss": t_loss[o], "saving": saving, "grow_index": g, "opt_index": o}


@pytest.fixture(scope="module")
def authors():
    return {r.small: r for r in analyze_logs(LOGS, rule="authors")}


@pytest.mark.parametrize("small,target,threshold", PAIRS)
def test_authors_rule_matches_independent_computation(authors, small, target, threshold):
    ref = _reference(small, target, threshold)
    r = authors[small]
    assert r.rule == "authors" and r.target == target and r.note == ""
    assert r.grow_step == ref["grow_step"] and r.restart_step == ref["restart_step"]
    assert r.opt_step == ref["opt_step"]
    assert r.grow_loss == ref["grow_loss"] and r.opt_loss == ref["opt_loss"]  # unsmoothed losses
    assert r.saving == pytest.approx(ref["saving"], rel=1e-12)
    assert r.measured_constant == pytest.approx(ref["grow_step"] / ref["restart_step"], rel=1e-12)
    # and the indices, on the package's own view of the curve
    ac = authors_curve(read_curve(os.path.join(LOGS, small + ".csv")), r.small_params, B)
    assert authors_threshold_index(ac, threshold) == ref["grow_index"]


@pytest.mark.parametrize("small", list(PUBLISHED))
def test_authors_rule_matches_published_notebook(authors, small):
    saving, s_grow, restart, s_opt = PUBLISHED[small]
    r = authors[small]
    assert (r.grow_step, r.restart_step, r.opt_step) == (s_grow, restart, s_opt)
    assert round(r.saving, 3) == saving


def test_authors_rule_differs_from_online_rule(authors):
    online = {r.small: r for r in analyze_logs(LOGS)}
    # the centred window sees 2 points ahead and the forward difference one more: the authors' growth
    # points come 2-3 evaluations (100-150 steps) before the online rule's trailing window
    for small, r in authors.items():
        assert 100 <= online[small].grow_step - r.grow_step <= 150
        assert online[small].restart_step > r.restart_step
    assert online["GPT2_base_div2_width"].opt_step - authors["GPT2_base_div2_width"].opt_step == 150
    # the online rule's spike-gap artefact on GPT2_large (optimality at 2549) is absent from the authors' rule
    assert online["GPT2_large_div2_width"].opt_step == 2549 and authors["GPT2_large_div2_width"].opt_step == 7749


# ----------------------------------------------------------------------------------------- synthetic
def _knee_curve(knee, n_points=60):
    """log10 L piecewise linear in log10 step: slope -0.3 over intervals 1..knee, -0.01 after (geometric
    steps). The centred 5-point mean's forward difference at point i averages intervals i-1..i+3: the
    first point whose five intervals are all flat is i = knee + 2, the online rule's is knee + 5."""
    steps = 100.0 * 1.1 ** np.arange(n_points)
    inc = np.where(np.arange(1, n_points) <= knee, -0.3, -0.01) * np.log10(1.1)
    return Curve(steps, 10.0 ** (np.log10(6.0) + np.concatenate([[0.0], np.cumsum(inc)])), "knee")


@pytest.mark.parametrize("knee", [10, 23])
def test_authors_index_on_known_curve(knee):
    c = _knee_curve(knee)
    for n_params in (1e6, 7e8):  # N and B only shift x
        ac = authors_curve(c, n_params, B)
        assert math.isnan(ac.slope[-1]) and ac.slope[knee - 3] == pytest.approx(-0.3)
        assert authors_threshold_index(ac, -0.052) == knee + 2
        assert authors_threshold_index(ac, -0.003) is None  # never flatter than -0.004
        # 'reflect' edges flatten the last slopes (-0.008, -0.004 where the curve has -0.01)
        assert ac.slope[-3:-1] == pytest.approx([-0.008, -0.004])
    # fires at the steepest point itself when even that is above the threshold (the notebook's loop)
    ac = authors_curve(c, 1e6)
    assert authors_threshold_index(ac, -0.5) == int(np.nanargmin(ac.slope))
    # R: nearest unsmoothed loss, first on ties
    assert authors_restart_index(ac, c.loss[7] * 1.0001) == 7
    assert authors_restart_index(ac, 1e9) == 0


def test_authors_pair_on_known_curves():
    small, target = _knee_curve(10), _knee_curve(23)
    small.loss = small.loss * 1.05
    r = analyze_pair(small, target, "width", 1e6, 4e6, rule="authors")
    assert r.grow_step == small.steps[12]
    assert r.grow_loss == small.loss[12]
    i_r = int(np.argmin(np.abs(target.loss - small.loss[12])))
    assert r.restart_step == target.steps[i_r] and r.opt_step == target.steps[25]


# -------------------------------------------------------------------------------------- CLI, errors
def test_cli_rule(capsys):
    assert main(["analyze", "--logs", LOGS, "--rule", "authors"]) == 0
    text = capsys.readouterr().out
    for pct in ("21.6%", "13.2%", "25.5%", "14.8%"):
        assert pct in text
    assert main(["analyze", "--logs", LOGS]) == 0  # default unchanged: the online rule
    text = capsys.readouterr().out
    assert "22.1%" in text and "21.6%" not in text
    assert main(["analyze", os.path.join(LOGS, "GPT2_large_div2_depth.csv"), os.path.join(LOGS, "GPT2_large.csv"),
                 "--op", "alternate_id", "--rule", "authors"]) == 0
    assert "| 6799 | 3.241 | 4549 |" in capsys.readouterr().out
    assert main(["analyze", "--logs", LOGS, "--rule", "authors", "--smooth_x"]) == 2
    assert "smooth_x" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["analyze", "--logs", LOGS, "--rule", "nope"])
    capsys.readouterr()


def test_rule_errors():
    c = _knee_curve(10)
    with pytest.raises(ValueError, match="Unknown rule"):
        analyze_pair(c, c, "width", 1e6, 4e6, rule="centred")
    with pytest.raises(ValueError, match="smooth_x"):
        analyze_pair(c, c, "width", 1e6, 4e6, rule="authors", smooth_x=True)
