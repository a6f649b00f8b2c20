"""Plan a staged run under the scaling law: start size, steps per stage, when to grow, where to restart.

Model (the authors' planner, DESIGN.md):
- the target's goal is its loss at its own optimality point under the law: S* = optimality_step(N_T),
  L* = L(N_T, S*); the direct run costs C_direct = 6 N_T B S*;
- stage 0 trains the start model N_0 for s_0 steps: L_0 = L(N_0, s_0);
- after growth k the loss continues from the step at which the bigger model reaches the same loss:
  S_eff,k = steps_to_loss(N_k, L_{k-1}), and L_k = L(N_k, S_eff,k + s_k);
- the last stage runs until L_K = L*, which fixes s_K given s_0..s_{K-1};
- minimize C = sum_k 6 N_k B s_k over s_0..s_{K-1} >= 0 with s_K >= 0 (SLSQP, a few starts).
The trainer's step counter (which the LR schedule reads) restarts at R = S_grow / constant_op after each
growth (the authors' empirical constants, measured on real curves), where S_grow is the counter at growth.
The law's own restart point S_eff is reported beside it (`law_restart_step`) for comparison.
`law=` swaps Kaplan's constants for others (e.g. `compare.fit_law` on real curves); the plan records them.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import minimize

from ..config import ConfigError, GPTConfig, preset_config, preset_name
from .scaling_law import DEFAULT_BATCH_TOKENS, KAPLAN, ScalingLaw, check_positive, compute
from .slope import DEFAULT_DEPTH_OP, DEPTH_OPS, constant_op, op_kind

PLAN_FORMAT = "staged_fast.plan/1"
DEFAULT_RESTART_WARMUP_FRAC = 0.1  # restart warmup = 10% of the next stage's steps (our heuristic)
PF_DAY = 8.64e19  # FLOPs in one PF-day


@dataclass
class Stage:
    preset: str | None  # matching preset name, if any
    n_layer: int
    n_embd: int
    n_head: int
    n_params: int  # non-embedding, 12 * n_layer * d^2
    steps: int  # optimizer steps trained in this stage
    start_step: int  # step counter at the start of the stage: 0, then the previous growth's restart_step
    run_step_start: int  # optimizer steps taken in the whole run before this stage
    grow_op_after: str | None  # trainer op applied at the end of this stage; None for the last stage
    restart_step: int | None  # R: counter value after that growth, (start_step + steps) / constant_op
    restart_warmup: int | None  # LR re-warmup steps after that growth
    loss_end: float  # predicted loss at the end of the stage (scaling law, unscaled plan)
    compute: float  # 6 N B steps, FLOPs
    law_restart_step: float | None = None  # the law's equal-loss step of the next model (for comparison)

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps

    @property
    def run_step_end(self) -> int:
        return self.run_step_start + self.steps

    def config(self, **overrides) -> GPTConfig:
        return GPTConfig(n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head, **overrides)


@dataclass
class Plan:
    target: str  # preset name or shape string
    ops: list[str]  # trainer op per growth, in order
    batch_tokens: int
    stages: list[Stage]
    target_loss: float  # L* (law)
    direct_steps: int  # steps of the direct run to the same loss (scaled with the plan)
    total_compute: float  # staged, FLOPs
    direct_compute: float
    predicted_saving: float  # 1 - total / direct (law; unchanged by scaling)
    scaled_to_train_steps: int | None = None  # set by plan_for_run
    law_stage_steps: list[float] = field(default_factory=list)  # unrounded, unscaled optimum
    law: dict = field(default_factory=KAPLAN.to_dict)  # the scaling law's constants (ScalingLaw fields)

    @property
    def scaling_law(self) -> ScalingLaw:
        return ScalingLaw(**self.law)

    @property
    def train_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def growths(self) -> list[dict]:
        """One entry per growth, in the form the trainer consumes."""
        out = []
        for a, b in zip(self.stages[:-1], self.stages[1:]):
            out.append({
                "at_run_step": a.run_step_end,  # grow after this many optimizer steps of the run
                "at_schedule_step": a.end_step,  # the step counter's value then (S_grow)
                "op": a.grow_op_after,
                "kind": op_kind(a.grow_op_after),
                "constant_op": constant_op(a.grow_op_after),
                "restart_step": a.restart_step,
                "restart_warmup_steps": a.restart_warmup,
                "from": {"n_layer": a.n_layer, "n_embd": a.n_embd, "n_head": a.n_head},
                "to": {"n_layer": b.n_layer, "n_embd": b.n_embd, "n_head": b.n_head},
            })
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d = {"format": PLAN_FORMAT, **d, "train_steps": self.train_steps,
             "final_schedule_step": self.stages[-1].end_step, "growths": self.growths()}
        return d

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if d.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a staged_fast plan (format {d.get('format')!r}, expected {PLAN_FORMAT!r}).")
        d = {k: v for k, v in d.items() if k not in ("format", "train_steps", "final_schedule_step", "growths")}
        d["stages"] = [Stage(**s) for s in d["stages"]]
        return cls(**d)

    @classmethod
    def from_json(cls, text_or_path: str) -> "Plan":
        text = text_or_path
        if not text_or_path.lstrip().startswith("{"):
            with open(text_or_path) as f:
                text = f.read()
        return cls.from_dict(json.loads(text))

    def table(self) -> str:
        head = (f"{'stage':>5} {'shape':>14} {'preset':>22} {'N':>9} {'steps':>8} {'run steps':>15} "
                f"{'counter':>15} {'loss':>6} {'PF-days':>8}  growth after")
        lines = [head, "-" * len(head)]
        for i, s in enumerate(self.stages):
            grow = "-" if s.grow_op_after is None else (
                f"{s.grow_op_after}: R={s.restart_step}, warmup={s.restart_warmup}")
            lines.append(
                f"{i:>5} {f'{s.n_layer}L/{s.n_embd}d/{s.n_head}H':>14} {s.preset or '-':>22} "
                f"{s.n_params / 1e6:>8.1f}M {s.steps:>8} {f'{s.run_step_start}-{s.run_step_end}':>15} "
                f"{f'{s.start_step}-{s.end_step}':>15} {s.loss_end:>6.3f} {s.compute / PF_DAY:>8.3f}  {grow}")
        lines += [
            f"target {self.target}: loss {self.target_loss:.4f} (law, at its optimality point); "
            f"batch {self.batch_tokens} tokens/step",
            f"staged: {self.train_steps} steps, {self.total_compute / PF_DAY:.3f} PF-days; "
            f"direct: {self.direct_steps} steps, {self.direct_compute / PF_DAY:.3f} PF-days; "
            f"predicted saving {100 * self.predicted_saving:.1f}%",
        ]
        if self.law != KAPLAN.to_dict():
            law = self.scaling_law
            lines.append(f"law {law.name}: Nc={law.n_c:.4g}, aN={law.alpha_n:.4g}, Sc={law.s_c:.4g}, "
                         f"aS={law.alpha_s:.4g} (not Kaplan's)")
        if self.scaled_to_train_steps:
            lines.append(f"(stage lengths scaled to --train_steps {self.scaled_to_train_steps}; losses and "
                         f"saving are the law's for the unscaled plan)")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- sizes
def _resolve_target(target) -> tuple[str, GPTConfig]:
    if isinstance(target, GPTConfig):
        return preset_name(target) or target.shape_str(), target
    return target, preset_config(target)  # raises ConfigError naming the presets


def _normalize_op(op: str, depth_op: str) -> str:
    if op == "width":
        return "width"
    if op == "depth":
        return depth_op
    if op in DEPTH_OPS:
        return op
    raise ConfigError(f"Unknown growth operator {op!r} for the planner: use width, depth or one of "
                      f"{', '.join(DEPTH_OPS)} (give width and depth as two growths for both).")


def _shrink(cfg: GPTConfig, op: str) -> GPTConfig:
    """The config that `op` grows into `cfg` (halve width or depth)."""
    if op == "width":
        if cfg.n_embd % 2 or cfg.n_head % 2:
            raise ConfigError(f"cannot halve the width of {cfg.shape_str()}: n_embd and n_head must be even.")
        if cfg.arch == "llama":  # kv heads and the SwiGLU hidden halve with the width
            if cfg.n_kv_head % 2 or cfg.intermediate_size % 2:
                raise ConfigError(f"cannot halve the width of {cfg.shape_str()}: n_kv_head and intermediate_size "
                                  f"must be even.")
            return cfg.replace(n_embd=cfg.n_embd // 2, n_head=cfg.n_head // 2, n_kv_head=cfg.n_kv_head // 2,
                               intermediate_size=cfg.intermediate_size // 2)
        return cfg.replace(n_embd=cfg.n_embd // 2, n_head=cfg.n_head // 2)
    if cfg.n_layer % 2:
        raise ConfigError(f"cannot halve the depth of {cfg.shape_str()}: n_layer must be even.")
    return cfg.replace(n_layer=cfg.n_layer // 2)


def stage_configs(target: GPTConfig, ops: list[str]) -> list[GPTConfig]:
    """[start, after op 1, ..., target]: the target halved by each op, in reverse."""
    cfgs = [target]
    for op in reversed(ops):
        cfgs.insert(0, _shrink(cfgs[0], "width" if op == "width" else "depth"))
    return cfgs


# ------------------------------------------------------------------------------------------ optimizer
def _stage_losses(ns: list[float], steps: list[float], law: ScalingLaw = KAPLAN) -> tuple[list[float], list[float]]:
    """Losses at the end of each stage and the law's restart step of each stage (0 for stage 0)."""
    losses, s_eff = [], [0.0]
    for k, (n, s) in enumerate(zip(ns, steps)):
        if k > 0:
            s_eff.append(law.steps_to_loss(n, losses[-1]))
        losses.append(law.loss(n, s_eff[k] + s) if s_eff[k] + s > 0 else math.inf)
    return losses, s_eff


def _last_stage_steps(ns: list[float], first: list[float], target_loss: float, law: ScalingLaw = KAPLAN) -> float:
    """s_K that brings the last model to target_loss after stages `first` (may be negative)."""
    losses, _ = _stage_losses(ns[:-1], first, law)
    return law.steps_to_loss(ns[-1], target_loss) - law.steps_to_loss(ns[-1], losses[-1])


def optimize_stage_steps(ns: list[float], target_loss: float, s_direct: float,
                         law: ScalingLaw = KAPLAN) -> list[float]:
    """Stage lengths (steps) minimizing sum N_k s_k subject to reaching target_loss (SLSQP)."""
    k = len(ns) - 1
    if k == 0:
        return [s_direct]
    n_t = ns[-1]

    def full(u):  # u: first K stage lengths in units of s_direct
        first = [max(float(v), 1e-9) * s_direct for v in u]
        return first + [_last_stage_steps(ns, first, target_loss, law)]

    def cost(u):  # staged compute / direct compute
        return sum(n * s for n, s in zip(ns, full(u))) / (n_t * s_direct)

    best = None
    for u0 in (0.1, 0.3, 0.6):
        res = minimize(cost, np.full(k, u0), method="SLSQP", bounds=[(1e-6, 20.0)] * k,
                       constraints=[{"type": "ineq", "fun": lambda u: full(u)[-1] / s_direct}],
                       options={"ftol": 1e-12, "maxiter": 500})
        if full(res.x)[-1] >= -1e-6 * s_direct and (best is None or cost(res.x) < cost(best)):
            best = res.x
    if best is None or cost(best) >= 1.0:
        raise RuntimeError("the planner found no staged schedule cheaper than the direct run.")
    steps = full(best)
    steps[-1] = max(steps[-1], 0.0)
    return steps


def check_restart_warmup_frac(frac: float) -> None:
    """The restart warmup is a fraction of the next stage: a finite number in [0, 1] (0: no warmup)."""
    if not 0.0 <= frac <= 1.0:  # NaN fails too
        raise ConfigError(f"restart_warmup_frac must be in [0, 1] (a fraction of the next stage's steps; 0 for no "
                          f"LR re-warmup), got {frac!r}.")


def plan_stages(target, ops: list[str], *, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                depth_op: str = DEFAULT_DEPTH_OP,
                restart_warmup_frac: float = DEFAULT_RESTART_WARMUP_FRAC, law: ScalingLaw = KAPLAN) -> Plan:
    """The compute-optimal staged plan for `target` (preset name or GPTConfig) grown by `ops`,
    under `law` (Kaplan's constants unless given)."""
    if not ops:
        raise ConfigError("give at least one growth operator, e.g. ops=['width'].")
    check_positive(batch_tokens=batch_tokens)
    check_restart_warmup_frac(restart_warmup_frac)
    name, target_cfg = _resolve_target(target)
    trainer_ops = [_normalize_op(op, depth_op) for op in ops]
    cfgs = stage_configs(target_cfg, trainer_ops)
    ns = [c.n_params_non_embedding for c in cfgs]
    s_direct = law.optimality_step(ns[-1])
    target_loss = law.loss(ns[-1], s_direct)
    law_steps = optimize_stage_steps(ns, target_loss, s_direct, law)
    return _build(name, cfgs, trainer_ops, law_steps, [max(1, round(s)) for s in law_steps],
                  target_loss, s_direct, batch_tokens, restart_warmup_frac, None, law)


def _build(name, cfgs, ops, law_steps, int_steps, target_loss, s_direct, batch_tokens, warmup_frac,
           scaled_to, law: ScalingLaw = KAPLAN) -> Plan:
    ns = [c.n_params_non_embedding for c in cfgs]
    losses, s_eff = _stage_losses(ns, law_steps, law)
    stages, counter, run_step = [], 0, 0
    for k, (cfg, steps) in enumerate(zip(cfgs, int_steps)):
        last = k == len(cfgs) - 1
        op = None if last else ops[k]
        restart = None if last else max(1, round((counter + steps) / constant_op(op)))
        # at least one step of a warmup asked for; 0 only when none is
        warm = None if last else (max(1, round(warmup_frac * int_steps[k + 1])) if warmup_frac > 0 else 0)
        stages.append(Stage(preset_name(cfg), cfg.n_layer, cfg.n_embd, cfg.n_head, ns[k], int(steps), counter,
                            run_step, op, restart, warm, float(losses[k]),
                            compute(ns[k], batch_tokens, steps), None if last else float(s_eff[k + 1])))
        run_step += steps
        counter = restart if restart is not None else counter + steps
    total = sum(s.compute for s in stages)
    scale = (sum(int_steps) / sum(law_steps)) if scaled_to else 1.0
    direct_steps = max(1, round(s_direct * scale))
    direct = compute(ns[-1], batch_tokens, direct_steps)
    law_saving = 1.0 - sum(n * s for n, s in zip(ns, law_steps)) / (ns[-1] * s_direct)
    return Plan(name, list(ops), int(batch_tokens), stages, float(target_loss), direct_steps, total, direct,
                float(law_saving), scaled_to, [float(s) for s in law_steps], law.to_dict())


def plan_for_run(target, ops: list[str], train_steps: int | None = None, *,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS, depth_op: str = DEFAULT_DEPTH_OP,
                 restart_warmup_frac: float = DEFAULT_RESTART_WARMUP_FRAC, law: ScalingLaw = KAPLAN) -> Plan:
    """`plan_stages`, with stage lengths scaled so the run takes exactly `train_steps` optimizer steps.

    Approximation: the law is fitted on GPT-2-scale runs at the critical batch; a small run keeps only the
    plan's shape (each stage's fraction of the run, restart R = S_grow / constant_op, warmup fraction).
    """
    plan = plan_stages(target, ops, batch_tokens=batch_tokens, depth_op=depth_op,
                       restart_warmup_frac=restart_warmup_frac, law=law)
    if train_steps is None:
        return plan
    n = len(plan.stages)
    if train_steps < n:
        raise ConfigError(f"train_steps={train_steps} is too short for {n} stages (need >= {n}).")
    total = sum(plan.law_stage_steps)
    ints = [max(1, round(s * train_steps / total)) for s in plan.law_stage_steps[:-1]]
    ints.append(train_steps - sum(ints))
    if ints[-1] < 1:
        raise ConfigError(f"train_steps={train_steps} leaves no steps for the last stage.")
    name, target_cfg = _resolve_target(target)
    cfgs = stage_configs(target_cfg, plan.ops)
    s_direct = law.optimality_step(cfgs[-1].n_params_non_embedding)
    return _build(name, cfgs, plan.ops, plan.law_stage_steps, ints, plan.target_loss, s_direct, batch_tokens,
                  restart_warmup_frac, train_steps, law)


def law_curves(plan: Plan, points: int = 200) -> dict:
    """Predicted loss against compute (law, unscaled stage lengths) for the staged plan and the direct run."""
    law = plan.scaling_law
    ns = [s.n_params for s in plan.stages]
    _, s_eff = _stage_losses(ns, plan.law_stage_steps, law)
    b = plan.batch_tokens
    staged_c, staged_l, c0 = [], [], 0.0
    for n, s, se in zip(ns, plan.law_stage_steps, s_eff):
        t = np.linspace(s / points if se == 0 else 0.0, s, points)
        staged_c.append(c0 + compute(n, b, t))
        staged_l.append(np.array([law.loss(n, se + v) for v in t]))
        c0 += compute(n, b, s)
    s_direct = law.optimality_step(ns[-1])
    sd = np.geomspace(s_direct / 1e3, s_direct, points)
    return {"staged": (np.concatenate(staged_c), np.concatenate(staged_l)),
            "growth": [(c[-1], l[-1]) for c, l in zip(staged_c[:-1], staged_l[:-1])],
            "direct": (compute(ns[-1], b, sd), np.array([law.loss(ns[-1], v) for v in sd]))}


def plot_formats() -> dict[str, str]:
    """{file extension: format} that `plot_plan` can write (matplotlib's Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return FigureCanvasAgg.get_supported_filetypes()


def plot_plan(plan: Plan, path: str) -> None:
    """PNG of predicted loss against compute (PF-days), staged and direct."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cur = law_curves(plan)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(cur["direct"][0] / PF_DAY, cur["direct"][1], label=f"direct ({plan.target})")
    ax.plot(cur["staged"][0] / PF_DAY, cur["staged"][1], label="staged: " + " -> ".join(
        s.preset or f"{s.n_layer}L/{s.n_embd}d" for s in plan.stages))
    for c, l in cur["growth"]:
        ax.plot([c / PF_DAY], [l], "ko", ms=4)
    ax.axhline(plan.target_loss, color="gray", lw=0.8, ls="--", label=f"target loss {plan.target_loss:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("compute (PF-days, 6NBS)")
    ax.set_ylabel("predicted loss (nats/token)")
    ax.set_ylim(plan.target_loss * 0.97, plan.target_loss * 1.6)
    ax.set_title(f"Scaling-law plan: predicted saving {100 * plan.predicted_saving:.1f}%")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
