"""The planner against the authors' curves: why the law predicts less saving than the curves show.

`python -m staged_fast.schedule compare-curves` prints the tables of docs/schedule.md ("The planner
against the curves"); `compare_planner_with_curves` returns them as data.

Both sides compute the same quantity. With S_g the small model's steps, R the target step at which the
grown model continues, and S_goal the target's steps to its goal (its optimality point):

    saving = 1 - (N_s S_g + N_t (S_goal - R)) / (N_t S_goal) = dS / S_goal,   dS = R - (N_s / N_t) S_g,

dS being the target steps the small stage saves. The planner takes R and S_goal from the law, the
curves take them from the slope rule; this module reports dS and S_goal apart so the gap can be traced.

- `fit_law`: the law's four constants fitted to real curves (least squares on ln L; points at or after
  `min_step`; every curve weighs the same however many points it has).
- `local_slope`: least-squares slope of log10 L on log10 step over [S / r, S r], a smooth reading of the
  slope the slope rule differentiates point by point.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .planner import plan_stages
from .scaling_law import DEFAULT_BATCH_TOKENS, KAPLAN, OPTIMALITY_SLOPE, ScalingLaw
from .slope import LOG_PAIRS, Curve, PairResult, analyze_logs, authors_curve, read_curve, remove_spikes

DEFAULT_MIN_STEP = 3000  # the authors' runs warm the LR up over 3000 steps; the law does not model warmup
FIT_MIN_STEPS = (1000, 2000, 3000)  # the fit's sensitivity to where it starts
LOCAL_SLOPE_RATIO = 1.25  # local_slope window: [S / 1.25, S * 1.25]
LOG_NAMES = ("GPT2_base", "GPT2_base_div2_width", "GPT2_base_div2_depth",
             "GPT2_large", "GPT2_large_div2_width", "GPT2_large_div2_depth")


def default_logs_dir() -> str | None:
    """The repository's copy of the authors' curves (tests/data/staged_training_logs), if present."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.normpath(os.path.join(here, "..", "..", "tests", "data", "staged_training_logs"))
    return path if os.path.isdir(path) else None


def read_logs(logs_dir: str) -> dict[str, tuple[Curve, int]]:
    """{preset: (curve, non-embedding params)} for the six curves in `logs_dir`."""
    from ..config import preset_config

    return {name: (read_curve(os.path.join(logs_dir, name + ".csv")),
                   preset_config(name).n_params_non_embedding) for name in LOG_NAMES}


# ----------------------------------------------------------------------------------------------- fit
@dataclass
class LawFit:
    law: ScalingLaw
    min_step: float
    n_points: int
    rms: float  # rms of ln(L_law / L_curve) over the fitted points, each point once
    rms_kaplan: float  # the same for Kaplan's constants
    rms_per_curve: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["law"] = self.law.to_dict()
        return d


def _ln_residuals(law: ScalingLaw, n, s, loss):
    return np.log((law.n_c / n) ** law.alpha_n + (2.0 * law.s_c / s) ** law.alpha_s) - np.log(loss)


def fit_law(curves: dict[str, tuple[Curve, float]], min_step: float = DEFAULT_MIN_STEP,
            start: ScalingLaw = KAPLAN) -> LawFit:
    """Fit (Nc, aN, Sc, aS) of L = (Nc/N)^aN + (2 Sc/S)^aS to spike-removed curves, steps >= min_step.

    Least squares on ln L (relative errors), each curve weighted by 1/sqrt(its point count) so a long
    curve does not outvote a short one. Starts from `start` (Kaplan's constants).
    """
    from scipy.optimize import least_squares

    ns, ss, ls, ws, names = [], [], [], [], []
    for name, (curve, n_params) in curves.items():
        steps, loss = remove_spikes(curve.steps, curve.loss)
        keep = steps >= min_step
        if keep.sum() < 2:
            raise ValueError(f"curve {name!r} has fewer than 2 points at step >= {min_step}.")
        k = int(keep.sum())
        ns.append(np.full(k, float(n_params)))
        ss.append(steps[keep])
        ls.append(loss[keep])
        ws.append(np.full(k, 1.0 / np.sqrt(k)))
        names += [name] * k
    n, s, loss, w = (np.concatenate(a) for a in (ns, ss, ls, ws))
    names = np.array(names)

    def law_of(p):
        return ScalingLaw(10.0 ** p[0], p[1], 10.0 ** p[2], p[3], name=f"fit to the curves (steps >= {min_step:g})")

    p0 = [np.log10(start.n_c), start.alpha_n, np.log10(start.s_c), start.alpha_s]
    res = least_squares(lambda p: w * _ln_residuals(law_of(p), n, s, loss), p0,
                        bounds=([0.0, 1e-3, -3.0, 0.05], [30.0, 1.0, 8.0, 3.0]), x_scale=[1.0, 0.01, 1.0, 0.1],
                        xtol=1e-12, ftol=1e-12, gtol=1e-12)
    if not res.success:
        raise RuntimeError(f"the law fit did not converge: {res.message}")
    law = law_of(res.x)
    r = _ln_residuals(law, n, s, loss)
    per_curve = {name: float(np.sqrt(np.mean(r[names == name] ** 2))) for name in curves}
    rk = _ln_residuals(KAPLAN, n, s, loss)
    return LawFit(law, float(min_step), int(len(n)), float(np.sqrt(np.mean(r**2))),
                  float(np.sqrt(np.mean(rk**2))), per_curve)


# ------------------------------------------------------------------------------------- local slope
def local_slope(curve: Curve, step: float, ratio: float = LOCAL_SLOPE_RATIO) -> float | None:
    """Least-squares slope of log10(loss) on log10(step) over spike-removed points in [step/ratio, step*ratio].

    Along one curve d log C = d log step, so this is the slope the slope rule thresholds, read off ~2 x
    log10(ratio) decades of points instead of one 5-point difference. None if the window leaves the curve.
    """
    steps, loss = remove_spikes(curve.steps, curve.loss)
    if step / ratio < steps[0] or step * ratio > steps[-1]:
        return None
    m = (steps >= step / ratio) & (steps <= step * ratio)
    if m.sum() < 3:
        return None
    return float(np.polyfit(np.log10(steps[m]), np.log10(loss[m]), 1)[0])


def local_slope_crossing(curve: Curve, threshold: float = OPTIMALITY_SLOPE, ratio: float = LOCAL_SLOPE_RATIO,
                         min_step: float = 1000) -> float | None:
    """First spike-removed step >= min_step whose `local_slope` exceeds `threshold`; None if the curve
    ends first (the window [S/ratio, S*ratio] must fit inside the curve)."""
    steps, _ = remove_spikes(curve.steps, curve.loss)
    for s in steps[steps >= min_step]:
        k = local_slope(curve, s, ratio)
        if k is None:
            if s * ratio > steps[-1]:
                return None
            continue
        if k > threshold:
            return float(s)
    return None


def point_slope_sd(curve: Curve, n_params: float, step: float, ratio: float = LOCAL_SLOPE_RATIO,
                   batch_tokens: float = DEFAULT_BATCH_TOKENS) -> float | None:
    """Standard deviation of the authors' point-by-point slopes over [step/ratio, step*ratio]: how far the
    quantity the rule thresholds scatters around the `local_slope` there. None if the window leaves the curve."""
    ac = authors_curve(curve, n_params, batch_tokens)
    if step / ratio < ac.steps[0] or step * ratio > ac.steps[-1]:
        return None
    m = (ac.steps >= step / ratio) & (ac.steps <= step * ratio) & np.isfinite(ac.slope)
    return float(np.std(ac.slope[m])) if m.sum() >= 3 else None


def best_steps_saved(small: Curve, target: Curve, n_small: float, n_target: float) -> tuple[float, float]:
    """(max dS, S_grow there) over every growth point of the small curve: dS = R - (N_s/N_t) S_grow, R the
    target step whose loss is nearest, both curves smoothed as the authors' rule smooths (centred 5-point
    mean of log10 L), so the maximum is not a maximum of noise. Independent of any goal. Growth points
    whose loss the target curve never reaches are skipped."""
    s = authors_curve(small, n_small)
    t = authors_curve(target, n_target)
    r = t.steps[np.argmin(np.abs(t.y[None, :] - s.y[:, None]), axis=1)]
    ds = np.where(s.y >= t.y.min(), r - n_small / n_target * s.steps, -np.inf)
    i = int(np.argmax(ds))
    return float(ds[i]), float(s.steps[i])


# ------------------------------------------------------------------------------------------ per pair
@dataclass
class LawPlan:
    """The planner's two-stage plan for one pair under one law (unrounded law steps)."""

    law: str
    saving: float
    grow_step: float  # s0: the small model's steps
    restart_step: float  # the law's equal-loss step of the target (S_eff)
    goal_step: float  # S*: the target's optimality point under the law
    steps_saved: float  # dS = R - (N_s/N_t) s0 (so saving = dS / S*)


@dataclass
class PairComparison:
    small: str
    target: str
    op: str
    small_params: int
    target_params: int
    planner_kaplan: LawPlan
    planner_fit: LawPlan
    authors: PairResult  # the authors' rule on the curves
    online_smooth_x: PairResult  # the online rule with --smooth_x (the literal online rule is n/a on GPT2_large)
    measured_steps_saved: float  # dS of the authors' rule: R - (N_s/N_t) S_grow
    best_steps_saved: float  # the largest dS any growth point of the small curve gives (best_steps_saved)
    best_grow_step: float  # ... and that growth point
    kaplan_at_measured: float  # Kaplan's law, growth at the authors' S_grow, goal the authors' S_opt
    fit_at_measured: float  # the fitted law, same points
    local_slope_at_opt: float | None  # local_slope of the target curve at the authors' S_opt
    point_slope_sd_at_opt: float | None  # scatter of the rule's point slopes there (point_slope_sd)
    local_slope_goal: float | None  # where the target's local_slope crosses -0.052; None: past the curve's end
    target_last_step: float

    def measured_over(self, goal: float | None) -> float | None:
        """The curves' measured dS divided by another goal: the saving toward that goal, same growth."""
        return None if goal is None else self.measured_steps_saved / goal


@dataclass
class Comparison:
    fit: LawFit
    sensitivity: list[tuple[LawFit, dict[str, float]]]  # (fit from another min_step, {pair: planner saving})
    pairs: list[PairComparison]

    def to_dict(self) -> dict:
        return {"fit": self.fit.to_dict(),
                "sensitivity": [{"fit": f.to_dict(), "planner_saving": sv} for f, sv in self.sensitivity],
                "pairs": [{**{k: v for k, v in asdict(p).items() if k not in ("authors", "online_smooth_x")},
                           "authors": p.authors.to_dict(), "online_smooth_x": p.online_smooth_x.to_dict()}
                          for p in self.pairs]}


def _law_plan(law: ScalingLaw, target: str, op: str, n_s: float, n_t: float) -> LawPlan:
    plan = plan_stages(target, [op], law=law)
    s0 = plan.law_stage_steps[0]
    r = plan.stages[0].law_restart_step
    goal = law.optimality_step(n_t)
    return LawPlan(law.name, plan.predicted_saving, s0, r, goal, r - n_s / n_t * s0)


def _law_at(law: ScalingLaw, n_s, n_t, s_grow, s_goal) -> float:
    r = law.steps_to_loss(n_t, law.loss(n_s, s_grow))
    return (n_t * r - n_s * s_grow) / (n_t * s_goal)


def compare_planner_with_curves(logs_dir: str, min_step: float = DEFAULT_MIN_STEP,
                                batch_tokens: float = DEFAULT_BATCH_TOKENS,
                                sensitivity_steps=FIT_MIN_STEPS) -> Comparison:
    """The planner (Kaplan's constants, and constants fitted to the curves) beside the curves' savings."""
    curves = read_logs(logs_dir)
    fit = fit_law(curves, min_step)
    authors = {r.small: r for r in analyze_logs(logs_dir, batch_tokens, rule="authors")}
    online = {r.small: r for r in analyze_logs(logs_dir, batch_tokens, smooth_x=True)}
    pairs = []
    for small, target, op in LOG_PAIRS:
        n_s, n_t = curves[small][1], curves[target][1]
        a = authors[small]
        if a.saving is None:
            raise RuntimeError(f"the authors' rule gives no saving for {small} -> {target}: {a.note}")
        t_curve = curves[target][0]
        pairs.append(PairComparison(
            small, target, op, n_s, n_t, _law_plan(KAPLAN, target, op, n_s, n_t),
            _law_plan(fit.law, target, op, n_s, n_t), a, online[small],
            a.restart_step - n_s / n_t * a.grow_step, *best_steps_saved(curves[small][0], t_curve, n_s, n_t),
            _law_at(KAPLAN, n_s, n_t, a.grow_step, a.opt_step), _law_at(fit.law, n_s, n_t, a.grow_step, a.opt_step),
            local_slope(t_curve, a.opt_step), point_slope_sd(t_curve, n_t, a.opt_step, batch_tokens=batch_tokens),
            local_slope_crossing(t_curve), float(t_curve.steps[-1])))
    sens = []
    for m in sorted(set(sensitivity_steps) | {min_step}):
        f = fit if m == min_step else fit_law(curves, m)
        sens.append((f, {f"{s} -> {t}": plan_stages(t, [op], law=f.law).predicted_saving for s, t, op in LOG_PAIRS}))
    return Comparison(fit, sens, pairs)


# ------------------------------------------------------------------------------------------- format
def _pct(v):
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _steps(v):
    return "n/a" if v is None else f"{v:.0f}"


def format_comparison(c: Comparison) -> str:
    """Markdown tables (also readable in a terminal): the side-by-side savings, then why they differ."""
    f = c.fit
    out = [f"Law constants (L = (Nc/N)^aN + (2 Sc/S)^aS), fitted to the six curves at steps >= {f.min_step:g} "
           f"({f.n_points} points; least squares on ln L, every curve weighted equally):",
           "",
           "| constants | Nc | aN | Sc | aS | rms ln(L_law/L_curve) |",
           "| --- | ---: | ---: | ---: | ---: | ---: |",
           f"| Kaplan et al. 2020 | {KAPLAN.n_c:.3g} | {KAPLAN.alpha_n:.4f} | {KAPLAN.s_c:.4g} | "
           f"{KAPLAN.alpha_s:.4f} | {f.rms_kaplan:.4f} |"]
    for g, _ in c.sensitivity:
        mark = " (used below)" if g.min_step == f.min_step else ""
        out.append(f"| fitted, steps >= {g.min_step:g}{mark} | {g.law.n_c:.3g} | {g.law.alpha_n:.4f} | "
                   f"{g.law.s_c:.4g} | {g.law.alpha_s:.4f} | {g.rms:.4f} |")
    out += ["",
            "Predicted (planner) against measured (curves), saving of compute to the target's optimality point:",
            "",
            "| small -> target | planner, Kaplan | planner, fitted law | "
            + " | ".join(f"planner, fit >= {g.min_step:g}" for g, _ in c.sensitivity if g.min_step != f.min_step)
            + " | measured, authors' rule | measured, online rule --smooth_x |",
            "| --- | ---: | ---: | " + "---: | " * (len(c.sensitivity) - 1) + "---: | ---: |"]
    for p in c.pairs:
        key = f"{p.small} -> {p.target}"
        sens = " | ".join(_pct(sv[key]) for g, sv in c.sensitivity if g.min_step != f.min_step)
        out.append(f"| {key} | {_pct(p.planner_kaplan.saving)} | {_pct(p.planner_fit.saving)} | {sens} | "
                   f"{_pct(p.authors.saving)} | {_pct(p.online_smooth_x.saving)} |")
    out += ["",
            "Why: saving = dS / S_goal, dS = R - (N_s/N_t) S_grow the target steps the small stage saves, "
            "S_goal the target's steps to its goal:",
            "",
            "| small -> target | dS: Kaplan plan | dS: fitted plan | dS: curves (authors' rule) | "
            "dS: curves, best growth point (S_grow) | "
            "S_goal: Kaplan S* | S_goal: fitted S* | S_goal: curves' rule S_opt | "
            f"local slope at S_opt (sd of the rule's point slopes) | S where the local slope reaches "
            f"{OPTIMALITY_SLOPE} |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in c.pairs:
        goal = (_steps(p.local_slope_goal) if p.local_slope_goal is not None
                else f"> {p.target_last_step / LOCAL_SLOPE_RATIO:.0f} (curve ends)")
        ls = "n/a" if p.local_slope_at_opt is None else f"{p.local_slope_at_opt:.3f}"
        if p.point_slope_sd_at_opt is not None:
            ls += f" ({p.point_slope_sd_at_opt:.3f})"
        out.append(f"| {p.small} -> {p.target} | {_steps(p.planner_kaplan.steps_saved)} | "
                   f"{_steps(p.planner_fit.steps_saved)} | {_steps(p.measured_steps_saved)} | "
                   f"{_steps(p.best_steps_saved)} ({_steps(p.best_grow_step)}) | "
                   f"{_steps(p.planner_kaplan.goal_step)} | {_steps(p.planner_fit.goal_step)} | "
                   f"{_steps(p.authors.opt_step)} | {ls} | {goal} |")
    out += ["",
            "Same growth point, other goals (and the laws at the curves' own points):",
            "",
            "| small -> target | measured (authors' rule) | Kaplan law at the curves' S_grow, S_opt | "
            "fitted law at the curves' S_grow, S_opt | curves' dS / fitted S* | curves' dS / local-slope goal | "
            "curves' dS / Kaplan S* |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in c.pairs:
        out.append(f"| {p.small} -> {p.target} | {_pct(p.authors.saving)} | {_pct(p.kaplan_at_measured)} | "
                   f"{_pct(p.fit_at_measured)} | {_pct(p.measured_over(p.planner_fit.goal_step))} | "
                   f"{_pct(p.measured_over(p.local_slope_goal))} | "
                   f"{_pct(p.measured_over(p.planner_kaplan.goal_step))} |")
    return "\n".join(out)
