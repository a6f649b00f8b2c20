"""The planner against the authors' curves (`schedule compare-curves`, staged_fast/schedule/compare.py),
and the scaling law with other constants (ScalingLaw, plan_stages(law=...))."""
import json
import os

import numpy as np
import pytest

from staged_fast.config import preset_config
from staged_fast.schedule import Plan, analyze_logs, loss_scaling_law, optimality_step, plan_stages, steps_to_loss
from staged_fast.schedule.__main__ import main
from staged_fast.schedule.compare import (compare_planner_with_curves, default_logs_dir, fit_law, local_slope,
                                          local_slope_crossing, read_logs)
from staged_fast.schedule.scaling_law import KAPLAN, ScalingLaw
from staged_fast.schedule.slope import Curve

LOGS = os.path.join(os.path.dirname(__file__), "data", "staged_training_logs")
SIZES = ("GPT2_base", "GPT2_base_div2_width", "GPT2_base_div2_depth",
         "GPT2_large", "GPT2_large_div2_width", "GPT2_large_div2_depth")


# ------------------------------------------------------------------------------------------ the law
def test_scaling_law_object_is_kaplan_by_default():
    n = preset_config("GPT2_large").n_params_non_embedding
    assert KAPLAN == ScalingLaw(8.8e13, 0.076, 2.1e3, 0.76)
    assert KAPLAN.loss(n, 1e4) == loss_scaling_law(n, 1e4)
    assert KAPLAN.optimality_step(n) == optimality_step(n)
    law = ScalingLaw(3e16, 0.06, 700.0, 0.77, name="other")
    assert law.loss(1e8, 1e4) == pytest.approx((3e16 / 1e8) ** 0.06 + (1400 / 1e4) ** 0.77, rel=1e-12)
    assert law.steps_to_loss(1e8, law.loss(1e8, 1234.0)) == pytest.approx(1234.0, rel=1e-10)
    assert law.slope(1e8, law.optimality_step(1e8)) == pytest.approx(-0.052, rel=1e-10)
    with pytest.raises(ValueError, match="never reaches"):
        law.steps_to_loss(1e8, 1.0)


def test_plan_under_another_law_records_it(tmp_path):
    law = ScalingLaw(3e16, 0.06, 700.0, 0.77, name="other")
    plan = plan_stages("GPT2_large", ["width"], law=law)
    assert plan.law == law.to_dict() and plan.scaling_law == law
    n_t = plan.stages[1].n_params
    assert plan.target_loss == pytest.approx(law.loss(n_t, law.optimality_step(n_t)))
    assert plan.predicted_saving != pytest.approx(plan_stages("GPT2_large", ["width"]).predicted_saving)
    assert "not Kaplan's" in plan.table() and "not Kaplan's" not in plan_stages("GPT2_large", ["width"]).table()
    assert Plan.from_json(plan.to_json()) == plan
    # a plan written before plans recorded their law reads back as Kaplan's
    d = json.loads(plan_stages("GPT2_large", ["width"]).to_json())
    del d["law"]
    assert Plan.from_dict(d).scaling_law == KAPLAN


# -------------------------------------------------------------------------------------------- fit
def _law_curves(law, steps):
    return {name: (Curve(steps, np.array([law.loss(n, s) for s in steps]), name), n)
            for name, n in ((x, preset_config(x).n_params_non_embedding) for x in SIZES)}


def test_fit_recovers_known_constants():
    truth = ScalingLaw(3e16, 0.0587, 700.0, 0.77)
    fit = fit_law(_law_curves(truth, np.arange(49.0, 20000.0, 50.0)), min_step=3000)
    assert fit.law.n_c == pytest.approx(truth.n_c, rel=1e-4)
    assert fit.law.alpha_n == pytest.approx(truth.alpha_n, rel=1e-5)
    assert fit.law.s_c == pytest.approx(truth.s_c, rel=1e-5)
    assert fit.law.alpha_s == pytest.approx(truth.alpha_s, rel=1e-5)
    assert fit.rms < 1e-8 and fit.rms_kaplan > 0.01
    assert fit.n_points == 6 * np.count_nonzero(np.arange(49.0, 20000.0, 50.0) >= 3000)


def test_local_slope_on_known_curves():
    steps = np.arange(49.0, 20000.0, 50.0)
    power = Curve(steps, 7.0 * steps**-0.08, "power")
    assert local_slope(power, 5000) == pytest.approx(-0.08, rel=1e-9)
    assert local_slope(power, 17000) is None  # the window leaves the curve
    law = ScalingLaw(3e16, 0.06, 700.0, 0.77)
    n = 1e8
    c = Curve(steps, np.array([law.loss(n, s) for s in steps]), "law")
    s_star = law.optimality_step(n)  # ~4.7k steps for these constants
    crossing = local_slope_crossing(c)
    assert crossing == pytest.approx(s_star, rel=0.03)  # the window averages a slowly changing slope
    assert local_slope_crossing(Curve(steps, 7.0 * steps**-0.08, "power")) is None


# ------------------------------------------------------------------------------ the shipped curves
@pytest.fixture(scope="module")
def comparison():
    return compare_planner_with_curves(LOGS)


def test_fit_to_shipped_curves(comparison):
    fit = comparison.fit
    assert fit.min_step == 3000 and fit.n_points > 2000
    assert fit.rms < 0.01 < 0.04 < fit.rms_kaplan  # ~0.8% against Kaplan's ~4.5%
    assert 0.05 < fit.law.alpha_n < 0.07 and 0.7 < fit.law.alpha_s < 0.85  # aN below Kaplan's, aS near it
    # the fitted law puts GPT2_large's optimality point ~3.6x earlier than Kaplan's
    n = preset_config("GPT2_large").n_params_non_embedding
    assert 3 < KAPLAN.optimality_step(n) / fit.law.optimality_step(n) < 4.5
    assert [f.min_step for f, _ in comparison.sensitivity] == [1000, 2000, 3000]
    assert comparison.sensitivity[-1][0] is fit


def test_comparison_pairs(comparison):
    authors = {r.small: r for r in analyze_logs(LOGS, rule="authors")}
    online = {r.small: r for r in analyze_logs(LOGS, smooth_x=True)}
    kaplan = {"width": plan_stages("GPT2_large", ["width"]).predicted_saving,
              "depth": plan_stages("GPT2_large", ["depth"]).predicted_saving}
    assert round(100 * kaplan["width"], 1) == 9.1 and round(100 * kaplan["depth"], 1) == 6.5
    for p in comparison.pairs:
        a = authors[p.small]
        assert p.authors.saving == a.saving and p.online_smooth_x.saving == online[p.small].saving
        assert p.planner_kaplan.saving == pytest.approx(kaplan[p.op], rel=1e-9)  # scale-free under the law
        # saving = dS / S_goal, for the law's plans and for the curves
        for lp in (p.planner_kaplan, p.planner_fit):
            assert lp.saving == pytest.approx(lp.steps_saved / lp.goal_step, rel=1e-6)
        assert a.saving == pytest.approx(p.measured_steps_saved / a.opt_step, rel=1e-12)
        # the rule's growth point gives within 15% of the best dS on the smoothed curves
        assert p.measured_steps_saved < p.best_steps_saved < 1.15 * p.measured_steps_saved
        # the fitted law predicts more than Kaplan's and less than the slope rule measures
        assert p.planner_kaplan.saving < p.planner_fit.saving < a.saving
        # ... because the rule's goal comes early: the curve is still steeper than -0.052 there
        assert a.opt_step < p.planner_fit.goal_step < p.planner_kaplan.goal_step
        assert p.local_slope_at_opt < -0.07 and p.point_slope_sd_at_opt > 0.01
        # Kaplan's law at the curves' own growth and goal points predicts more than the curves show
        assert p.kaplan_at_measured > a.saving
        n_s, n_t = p.small_params, p.target_params
        r = steps_to_loss(n_t, loss_scaling_law(n_s, a.grow_step))
        assert p.kaplan_at_measured == pytest.approx((n_t * r - n_s * a.grow_step) / (n_t * a.opt_step), rel=1e-12)
    base = [p for p in comparison.pairs if p.target == "GPT2_base"]
    large = [p for p in comparison.pairs if p.target == "GPT2_large"]
    assert all(p.local_slope_goal == 8149 for p in base) and all(p.local_slope_goal is None for p in large)


def test_cli_compare_curves(capsys, tmp_path):
    assert default_logs_dir() == os.path.normpath(LOGS)
    out = str(tmp_path / "c.json")
    assert main(["compare-curves", "--json", out]) == 0
    text = capsys.readouterr().out
    assert "| GPT2_large_div2_width -> GPT2_large | 9.1% |" in text and "25.5%" in text
    d = json.load(open(out))
    assert len(d["pairs"]) == 4 and d["fit"]["law"]["alpha_s"] > 0
    assert main(["compare-curves", "--logs", str(tmp_path)]) == 2
    assert "No such curve file" in capsys.readouterr().err
    assert set(read_logs(LOGS)) == set(SIZES)


def test_docs_hold_the_current_tables(comparison):
    """docs/schedule.md quotes `compare-curves` and `analyze --rule authors` verbatim."""
    from staged_fast.schedule.__main__ import format_pairs
    from staged_fast.schedule.compare import format_comparison

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "schedule.md")).read()
    assert format_comparison(comparison) in doc
    assert format_pairs(analyze_logs(LOGS, rule="authors")) in doc


def test_other_fit_start_joins_the_sensitivity_rows():
    c = compare_planner_with_curves(LOGS, min_step=2500, sensitivity_steps=(1000,))
    assert [f.min_step for f, _ in c.sensitivity] == [1000, 2500] and c.sensitivity[1][0] is c.fit


def test_cli_compare_curves_checks_flags_before_the_work(capsys, tmp_path, monkeypatch):
    import staged_fast.schedule.compare as compare

    def no_work(*a, **k):
        raise AssertionError("the comparison ran before its flags were checked")

    monkeypatch.setattr(compare, "compare_planner_with_curves", no_work)
    assert main(["compare-curves", "--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --json") and "is a folder" in err
    for flag, value in (("--min_step", "nan"), ("--min_step", "inf"), ("--min_step", "-5"), ("--batch_tokens", "0")):
        with pytest.raises(SystemExit) as e:
            main(["compare-curves", f"{flag}={value}"])
        assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
