"""When to grow and what it saves: the scaling law, the slope rule on real curves, the planner.

`python -m staged_fast.schedule {analyze,plan,law,compare-curves}`; see docs/schedule.md.
"""
from .planner import PLAN_FORMAT, Plan, Stage, law_curves, plan_for_run, plan_stages, plot_plan, stage_configs
from .scaling_law import (ALPHA_B, ALPHA_N, ALPHA_S, B_STAR, DEFAULT_BATCH_TOKENS, KAPLAN, N_C, OPTIMALITY_SLOPE,
                          S_C, ScalingLaw, compute, critical_batch, law_summary, loss_scaling_law, loss_slope,
                          optimality_step, steps_to_loss)
from .slope import (DEFAULT_DEPTH_OP, DEPTH_OPS, LOG_PAIRS, RULES, THRESHOLDS, AuthorsCurve, Curve, PairResult,
                    SlopeCurve, SlopeTrigger, analyze_logs, analyze_pair, authors_curve, authors_restart_index,
                    authors_threshold_index, constant_op, find_threshold_index, op_kind, read_curve, remove_spikes,
                    restart_index, slope_curve, threshold_for)

__all__ = [
    "ALPHA_B", "ALPHA_N", "ALPHA_S", "B_STAR", "DEFAULT_BATCH_TOKENS", "KAPLAN", "N_C", "OPTIMALITY_SLOPE", "S_C",
    "ScalingLaw", "compute", "critical_batch", "law_summary", "loss_scaling_law", "loss_slope", "optimality_step",
    "steps_to_loss",
    "DEFAULT_DEPTH_OP", "DEPTH_OPS", "LOG_PAIRS", "RULES", "THRESHOLDS", "AuthorsCurve", "Curve", "PairResult",
    "SlopeCurve", "SlopeTrigger", "analyze_logs", "analyze_pair", "authors_curve", "authors_restart_index",
    "authors_threshold_index", "constant_op", "find_threshold_index", "op_kind", "read_curve", "remove_spikes",
    "restart_index", "slope_curve", "threshold_for",
    "PLAN_FORMAT", "Plan", "Stage", "law_curves", "plan_for_run", "plan_stages", "plot_plan", "stage_configs",
]
