"""The slope rule on real validation-loss curves: when to grow, when a model is "optimal", what it saves.

Two variants: `rule="online"` (the default; the trainer applies it live, `SlopeTrigger`) and
`rule="authors"` (the authors' offline analysis of their curves, exactly as their notebook computes it).

The online rule:
  1. spikes: walk the curve and drop a point whose loss is more than 1% above the last kept point;
  2. y = running mean (trailing window of 5 kept points) of log10(val_loss), x = log10(C), C = 6 N B step;
  3. dy/dx by backward finite differences between consecutive smoothed points;
  4. from the steepest point (minimum of dy/dx), the first later point where dy/dx exceeds a threshold.
     We also require the steepest slope to be below the threshold (a curve that never was steeper than
     the threshold has no crossing to find).
  5. R = the first target step whose smoothed loss is <= the small model's smoothed loss at growth.
`smooth_x=True` (not the default) also takes the running mean of x over the same window. It fixes an
artefact of the trailing rule: where a point is missing (a removed spike, a gap in the log), the smoothed
y moves by one window shift while x jumps two intervals, so dy/dx halves for one point and can cross the
threshold by accident (it does on GPT2_large: see docs/schedule.md). Trailing windows and backward
differences make the offline rule and the online `SlopeTrigger` see the same numbers.

The authors' rule (allenai/staged-training, notebooks/remove_oracle.ipynb), which needs the whole curve:
same spike removal; y = *centred* moving average of log10(loss) (scipy `uniform_filter1d`, size 5,
default 'reflect' edges), x = log10(C) unsmoothed; the slope at point i is the forward difference
(y[i+1] - y[i]) / (x[i+1] - x[i]); the point is the first i from the steepest slope on (inclusive) whose
slope exceeds the threshold; its loss is the *unsmoothed* spike-removed loss, and R is the target step
whose unsmoothed spike-removed loss is nearest to it (`authors_curve`, `authors_threshold_index`,
`authors_restart_index`).

Because N and B are constant along one model's curve, dx = d log10(step): neither rule's slope depends on
N or B; they only place the curve on the compute axis.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from .scaling_law import DEFAULT_BATCH_TOKENS, OPTIMALITY_SLOPE, check_positive, compute

RULES = ("online", "authors")  # analyze_pair(rule=...): the trainer's online rule, the authors' offline one

SPIKE_TOLERANCE = 0.01  # drop a point more than 1% above the last kept point
SMOOTH_WINDOW = 5

# Canonical growth kinds -> slope thresholds and constant_op (DESIGN.md, from the authors' analysis).
_KIND_THRESHOLD = {"optimality": OPTIMALITY_SLOPE, "depth": -0.0575, "width": -0.0475, "depth+width": -0.03}
_KIND_CONSTANT = {"width": 1.776, "depth": 1.412, "depth+width": 2.455}
# The trainer's operator names. Depth operators all count as "depth".
DEPTH_OPS = ("alternate_id", "append_id", "alternate_copy", "append_copy")
DEFAULT_DEPTH_OP = "alternate_id"  # the loss-preserving depth operator


def op_kind(op: str) -> str:
    """Map an operator name ("width", "depth", a trainer depth op, "depth+width") to its kind."""
    if op in ("width", "depth", "depth+width"):
        return op
    if op == "width+depth":
        return "depth+width"
    if op in DEPTH_OPS:
        return "depth"
    raise ValueError(
        f"Unknown growth operator {op!r}. Choose one of: width, depth, depth+width, {', '.join(DEPTH_OPS)}."
    )


THRESHOLDS: dict[str, float] = dict(_KIND_THRESHOLD)
THRESHOLDS.update({op: _KIND_THRESHOLD["depth"] for op in DEPTH_OPS})
THRESHOLDS["width+depth"] = _KIND_THRESHOLD["depth+width"]


def threshold_for(op: str) -> float:
    """Slope threshold for an operator name, or "optimality"."""
    return _KIND_THRESHOLD["optimality"] if op == "optimality" else _KIND_THRESHOLD[op_kind(op)]


def constant_op(op: str) -> float:
    """constant_op of an operator: R = S_grow / constant_op (width 1.776, depth 1.412, both 2.455)."""
    return _KIND_CONSTANT[op_kind(op)]


# ----------------------------------------------------------------------------------------- curves
@dataclass
class Curve:
    steps: np.ndarray  # optimizer steps, increasing
    loss: np.ndarray  # validation loss, nats/token
    name: str = ""


def read_curve(path: str) -> Curve:
    """Read a TensorBoard CSV export with columns `Step` and `Value` (`Wall time` is ignored)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such curve file: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        missing = [c for c in ("Step", "Value") if c not in fields]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; found {fields}. Expected a TensorBoard CSV export "
                f"with header 'Wall time,Step,Value'."
            )
        rows = [(float(r["Step"]), float(r["Value"])) for r in reader]
    if len(rows) < SMOOTH_WINDOW + 2:
        raise ValueError(f"{path}: {len(rows)} points; the slope rule needs at least {SMOOTH_WINDOW + 2}.")
    steps, loss = (np.asarray(c, dtype=np.float64) for c in zip(*rows))
    if np.any(np.diff(steps) <= 0):
        raise ValueError(f"{path}: steps must be strictly increasing.")
    name = os.path.splitext(os.path.basename(path))[0]
    return Curve(steps, loss, name)


def remove_spikes(steps: np.ndarray, loss: np.ndarray, tol: float = SPIKE_TOLERANCE):
    """Drop every point more than `tol` (relative) above the last kept point. Returns (steps, loss)."""
    keep = [0]
    for i in range(1, len(loss)):
        if loss[i] <= (1.0 + tol) * loss[keep[-1]]:
            keep.append(i)
    return steps[keep], loss[keep]


@dataclass
class SlopeCurve:
    """The smoothed curve the rule runs on; arrays are aligned (one entry per smoothed point)."""

    steps: np.ndarray  # step of the last point of each window
    x: np.ndarray  # log10(6 N B step)
    y: np.ndarray  # running mean of log10(loss)
    slope: np.ndarray  # dy/dx to the previous smoothed point; NaN at index 0

    @property
    def loss(self) -> np.ndarray:
        """Smoothed loss, 10**y (a geometric running mean)."""
        return 10.0**self.y


def slope_curve(curve: Curve, n_params: float, batch_tokens: float = DEFAULT_BATCH_TOKENS,
                window: int = SMOOTH_WINDOW, smooth_x: bool = False) -> SlopeCurve:
    steps, loss = remove_spikes(curve.steps, curve.loss)
    if len(steps) < window + 1:
        raise ValueError(f"curve {curve.name!r}: {len(steps)} points after spike removal, need > {window}.")
    logl = np.log10(loss)
    y = np.convolve(logl, np.ones(window) / window, mode="valid")  # trailing: y[i] ends at kept[i+window-1]
    s = steps[window - 1:]
    x = np.log10(compute(n_params, batch_tokens, steps))
    x = np.convolve(x, np.ones(window) / window, mode="valid") if smooth_x else x[window - 1:]
    slope = np.full(len(y), np.nan)
    slope[1:] = np.diff(y) / np.diff(x)
    return SlopeCurve(s, x, y, slope)


def find_threshold_index(sc: SlopeCurve, threshold: float) -> int | None:
    """Index of the first point after the steepest slope whose slope exceeds `threshold`, or None."""
    i_min = int(np.nanargmin(sc.slope))
    if not sc.slope[i_min] < threshold:
        return None
    later = np.nonzero(sc.slope[i_min + 1:] > threshold)[0]
    return int(i_min + 1 + later[0]) if len(later) else None


def restart_index(target: SlopeCurve, loss: float) -> int | None:
    """First index where the target's smoothed loss is <= `loss` (equal-loss restart point), or None."""
    hit = np.nonzero(target.loss <= loss)[0]
    return int(hit[0]) if len(hit) else None


# --------------------------------------------------------------------------------- the authors' rule
@dataclass
class AuthorsCurve:
    """The authors' rule's view of one curve; arrays aligned, one entry per spike-removed point."""

    steps: np.ndarray  # spike-removed steps
    loss: np.ndarray  # spike-removed, unsmoothed loss
    x: np.ndarray  # log10(6 N B step)
    y: np.ndarray  # centred moving average of log10(loss)
    slope: np.ndarray  # forward difference (y[i+1]-y[i]) / (x[i+1]-x[i]); NaN at the last point


def authors_curve(curve: Curve, n_params: float, batch_tokens: float = DEFAULT_BATCH_TOKENS,
                  window: int = SMOOTH_WINDOW) -> AuthorsCurve:
    """The authors' smoothing: centred `uniform_filter1d(log10 loss, window)` against log10(6 N B step)."""
    from scipy.ndimage import uniform_filter1d

    steps, loss = remove_spikes(curve.steps, curve.loss)
    if len(steps) < max(2, window):  # a centred window longer than the curve averages reflections of it
        raise ValueError(f"curve {curve.name!r}: {len(steps)} points after spike removal, need >= "
                         f"{max(2, window)} (the window is {window} points).")
    x = np.log10(compute(n_params, batch_tokens, steps))
    y = uniform_filter1d(np.log10(loss), size=window)
    slope = np.full(len(y), np.nan)
    slope[:-1] = np.diff(y) / np.diff(x)
    return AuthorsCurve(steps, loss, x, y, slope)


def authors_threshold_index(ac: AuthorsCurve, threshold: float) -> int | None:
    """First index i >= argmin(slope) with slope[i] > threshold (the authors' loop), or None.

    As in the notebook the search starts *at* the steepest point, so a curve whose steepest slope is
    already above the threshold fires there. Where no later slope exceeds the threshold the notebook's
    loop falls through and returns the last index it looked at; we return None instead.
    """
    i_min = int(np.nanargmin(ac.slope))
    later = np.nonzero(ac.slope[i_min:] > threshold)[0]
    return int(i_min + later[0]) if len(later) else None


def authors_restart_index(target: AuthorsCurve, loss: float) -> int:
    """Index of the target point whose (unsmoothed, spike-removed) loss is nearest to `loss` (first on ties)."""
    return int(np.argmin(np.abs(target.loss - loss)))


# ------------------------------------------------------------------------------------- pair analysis
@dataclass
class PairResult:
    small: str
    target: str
    op: str  # width | depth | depth+width
    small_params: float
    target_params: float
    batch_tokens: float
    grow_step: float | None  # S_grow on the small curve (slope rule, threshold of `op`)
    grow_loss: float | None  # small's smoothed loss there
    restart_step: float | None  # R: first target step with smoothed loss <= grow_loss
    measured_constant: float | None  # S_grow / R
    design_constant: float  # constant_op(op) from DESIGN.md
    opt_step: float | None  # target's step of optimality (threshold -0.052)
    opt_loss: float | None
    staged_compute: float | None  # C_small(S_grow) + C_target(S_opt - R)
    direct_compute: float | None  # C_target(S_opt)
    saving: float | None  # 1 - staged / direct, with the measured R; None if R >= S_opt
    saving_design_constant: float | None  # same with R = S_grow / design_constant
    window: int = SMOOTH_WINDOW
    smooth_x: bool = False
    note: str = ""  # why a field is None
    rule: str = "online"  # "online" (trailing window, smoothed losses) or "authors" (see the module docstring)

    def to_dict(self) -> dict:
        return asdict(self)


def _saving(small_n, target_n, b, s_grow, r, s_opt):
    """(staged, direct, saving); staged and saving are None when R >= S_opt: the grown model would start
    past the target's optimality point, so 'staged path to the optimality loss' is not defined."""
    direct = compute(target_n, b, s_opt)
    if r >= s_opt:
        return None, direct, None
    staged = compute(small_n, b, s_grow) + compute(target_n, b, s_opt - r)
    return staged, direct, 1.0 - staged / direct


def analyze_pair(small: Curve, target: Curve, op: str, small_params: float, target_params: float,
                 batch_tokens: float = DEFAULT_BATCH_TOKENS, window: int = SMOOTH_WINDOW,
                 smooth_x: bool = False, rule: str = "online") -> PairResult:
    """Growth step, restart step, constant_op, optimality and compute saving for one small->target pair.

    staged = C_small(S_grow) + C_target(S_opt - R); direct = C_target(S_opt); saving = 1 - staged/direct.
    Saving is None when R >= S_opt (growth happens after the target's optimality loss; see `note`).
    rule="online": trailing window, smoothed losses, R = first target step with smoothed loss <= L_grow;
    rule="authors": the authors' notebook (centred window, unsmoothed losses, R = nearest loss).
    """
    if rule not in RULES:
        raise ValueError(f"Unknown rule {rule!r}: choose one of {', '.join(RULES)}.")
    if rule == "authors" and smooth_x:
        raise ValueError("smooth_x belongs to the online rule; the authors' rule never smooths x.")
    if not (isinstance(window, (int, np.integer)) and window >= 1):
        raise ValueError(f"window must be a whole number of points >= 1, got {window!r}.")
    check_positive(small_params=small_params, target_params=target_params, batch_tokens=batch_tokens)
    kind = op_kind(op)
    if rule == "online":
        s_sc = slope_curve(small, small_params, batch_tokens, window, smooth_x)
        t_sc = slope_curve(target, target_params, batch_tokens, window, smooth_x)
        find, s_loss, t_loss = find_threshold_index, s_sc.loss, t_sc.loss
    else:
        s_sc = authors_curve(small, small_params, batch_tokens, window)
        t_sc = authors_curve(target, target_params, batch_tokens, window)
        find, s_loss, t_loss = authors_threshold_index, s_sc.loss, t_sc.loss
    res = PairResult(small.name, target.name, kind, small_params, target_params, batch_tokens,
                     None, None, None, None, constant_op(kind), None, None, None, None, None, None,
                     window, smooth_x, rule=rule)
    i_opt = find(t_sc, threshold_for("optimality"))
    if i_opt is not None:
        res.opt_step, res.opt_loss = float(t_sc.steps[i_opt]), float(t_loss[i_opt])
    else:
        res.note = "the target curve never crosses the optimality threshold"
    i_grow = find(s_sc, threshold_for(kind))
    if i_grow is None:
        res.note = "the small curve never crosses the growth threshold"
        return res
    res.grow_step, res.grow_loss = float(s_sc.steps[i_grow]), float(s_loss[i_grow])
    i_r = restart_index(t_sc, res.grow_loss) if rule == "online" else authors_restart_index(t_sc, res.grow_loss)
    if i_r is not None:
        res.restart_step = float(t_sc.steps[i_r])
        res.measured_constant = res.grow_step / res.restart_step
    else:
        res.note = "the target curve never reaches the small model's loss at growth"
    if res.opt_step is not None:
        if res.restart_step is not None:
            res.staged_compute, res.direct_compute, res.saving = _saving(
                small_params, target_params, batch_tokens, res.grow_step, res.restart_step, res.opt_step)
        r_design = res.grow_step / res.design_constant
        _, direct, res.saving_design_constant = _saving(
            small_params, target_params, batch_tokens, res.grow_step, r_design, res.opt_step)
        res.direct_compute = direct
        if res.restart_step is not None and res.saving is None:
            res.note = "R >= S_opt: the small model passes the target's optimality loss before growing"
    return res


# The four pairs of the shared logs: (small, target, op).
LOG_PAIRS = (
    ("GPT2_base_div2_width", "GPT2_base", "width"),
    ("GPT2_base_div2_depth", "GPT2_base", "depth"),
    ("GPT2_large_div2_width", "GPT2_large", "width"),
    ("GPT2_large_div2_depth", "GPT2_large", "depth"),
)


def analyze_logs(logs_dir: str, batch_tokens: float = DEFAULT_BATCH_TOKENS,
                 window: int = SMOOTH_WINDOW, smooth_x: bool = False, rule: str = "online") -> list[PairResult]:
    """Run `analyze_pair` on the four pairs of the authors' logs (`<preset>.csv` files in `logs_dir`)."""
    from ..config import preset_config

    out = []
    for small, target, op in LOG_PAIRS:
        cs = read_curve(os.path.join(logs_dir, small + ".csv"))
        ct = read_curve(os.path.join(logs_dir, target + ".csv"))
        out.append(analyze_pair(cs, ct, op, preset_config(small).n_params_non_embedding,
                                preset_config(target).n_params_non_embedding, batch_tokens, window,
                                smooth_x, rule))
    return out


# ------------------------------------------------------------------------------------ online trigger
class SlopeTrigger:
    """The slope rule, online: feed (step, val_loss) as evaluations arrive; `update` returns True once,
    at the point where the offline rule would fire on the curve seen so far.

    Online, the steepest point is the steepest seen so far: it fires at the first point after the running
    minimum of dy/dx (which must be below `threshold`) whose slope exceeds `threshold`. On a curve whose
    steepest point comes before its first crossing (the shared logs, typical curves) this is the offline
    answer. Spikes (> 1% above the last kept point) are skipped, as offline. After growth call
    `reset(n_params)`: the new model's curve starts afresh.
    """

    def __init__(self, threshold: float, window: int = SMOOTH_WINDOW, *, n_params: float,
                 batch_tokens: float = DEFAULT_BATCH_TOKENS, smooth_x: bool = False):
        if not threshold < 0:
            raise ValueError(f"threshold must be negative (a slope of log loss vs log compute), got {threshold}.")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}.")
        self.threshold = float(threshold)
        self.window = int(window)
        self.batch_tokens = float(batch_tokens)
        self.smooth_x = bool(smooth_x)
        self.reset(n_params)

    def reset(self, n_params: float) -> None:
        """Forget the curve (call after growth, with the new model's non-embedding parameter count)."""
        if not n_params > 0:
            raise ValueError(f"n_params must be > 0, got {n_params}.")
        self.n_params = float(n_params)
        self._last_step: float | None = None
        self._last_kept: float | None = None
        self._logs: list[float] = []  # log10 of the last `window` kept losses
        self._xs: list[float] = []  # log10 compute of the same points
        self._prev_xy: tuple[float, float] | None = None
        self.min_slope = math.inf
        self.last_slope: float | None = None
        self.fired = False

    def update(self, step: float, val_loss: float) -> bool:
        if not step > 0:
            raise ValueError(f"step must be > 0 (x = log10 of compute), got {step}.")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"steps must increase: got {step} after {self._last_step}.")
        if not (val_loss > 0 and math.isfinite(val_loss)):
            raise ValueError(f"val_loss must be positive and finite, got {val_loss}.")
        self._last_step = step
        if self.fired:
            return False
        if self._last_kept is not None and val_loss > (1.0 + SPIKE_TOLERANCE) * self._last_kept:
            return False  # spike
        self._last_kept = val_loss
        self._logs = (self._logs + [math.log10(val_loss)])[-self.window:]
        self._xs = (self._xs + [math.log10(compute(self.n_params, self.batch_tokens, step))])[-self.window:]
        if len(self._logs) < self.window:
            return False
        y = sum(self._logs) / self.window
        x = sum(self._xs) / self.window if self.smooth_x else self._xs[-1]
        prev, self._prev_xy = self._prev_xy, (x, y)
        if prev is None:
            return False
        slope = (y - prev[1]) / (x - prev[0])
        self.last_slope = slope
        if slope < self.min_slope:
            self.min_slope = slope
            return False
        if self.min_slope < self.threshold and slope > self.threshold:
            self.fired = True
            return True
        return False
