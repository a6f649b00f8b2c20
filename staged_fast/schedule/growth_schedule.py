"""When a training run grows: at fixed updates (--grow_at), where a plan says (--schedule plan.json), or
when the slope rule fires on the run's own validation curve (--grow_when slope).

The trainer asks `due(iteration)` after every update and feeds each validation loss to `observe`; what
to grow into, and how, is the trainer's (Trainer.grow).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..train_args import UsageError, growth_ops, model_config, restart_value


@dataclass
class GrowthRequest:
    op: str
    iteration: int | None  # grow once this many updates are done; None: when the slope rule fires
    restart_step: int | str | None = None  # None: take --restart_steps
    restart_warmup_steps: int | None = None  # None: take --restart_warmup_steps


def _llama_plan_start(args, plan) -> None:
    """A plan for a llama preset starts a llama run: kv heads and SwiGLU hidden of its first stage (the stages
    record n_layer/n_embd/n_head only), unless given by flags."""
    from ..config import LLAMA_PRESETS, preset_config

    if plan.target not in LLAMA_PRESETS or getattr(args, "arch", None) == "gpt2":
        return
    from .planner import stage_configs

    start = stage_configs(preset_config(plan.target), plan.ops)[0]
    args.arch = "llama"
    if getattr(args, "n_kv_head", None) is None:
        args.n_kv_head = start.n_kv_head
    if getattr(args, "intermediate_size", None) is None:
        args.intermediate_size = start.intermediate_size


def load_plan(args, log=print):
    """Read --schedule; the plan fixes the start size and the schedule's length (it edits `args`)."""
    if not args.schedule:
        return None
    from . import Plan

    try:
        plan = Plan.from_json(args.schedule)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(
            f"--schedule {args.schedule}: not a readable plan ({e}). Make one with "
            f"`python -m staged_fast.schedule plan --target SIZE --ops width --out plan.json`."
        ) from e
    first = plan.stages[0]
    if args.size is not None and not args.resume:
        asked = model_config(args, vocab_size=50257)
        if (asked.n_layer, asked.n_embd, asked.n_head) != (first.n_layer, first.n_embd, first.n_head):
            raise UsageError(
                f"--size {args.size} contradicts the plan, which starts at {first.n_layer}L/{first.n_embd}d/"
                f"{first.n_head}H; drop --size (the plan sets it)."
            )
    args.size, args.n_layer, args.n_embd, args.n_head = None, first.n_layer, first.n_embd, first.n_head
    _llama_plan_start(args, plan)
    final = plan.to_dict()["final_schedule_step"]
    log(f"plan {args.schedule}: {len(plan.growths())} growth(s); --train_steps set to the plan's final "
        f"schedule step {final}")
    args.train_steps = final
    return plan


class GrowthSchedule:
    def __init__(self, args, plan, *, n_params: int, batch_tokens: int, state: dict | None = None):
        state = state or {}
        if args.grow_at:
            self.requests = [GrowthRequest(op, int(it)) for it, op in zip(args.grow_at.split(","), growth_ops(args))]
        elif plan is not None:
            self.requests = [
                GrowthRequest(g["op"], g["at_run_step"], g["restart_step"], g["restart_warmup_steps"])
                for g in plan.growths()
            ]
        elif args.grow_when == "slope":
            self.requests = [GrowthRequest(op, None) for op in growth_ops(args)]
        else:
            self.requests = []
        self.next = state.get("next_growth", 0)
        self.points: list[tuple[int, float]] = []  # validation points since the last growth (slope rule)
        self.fired = False
        self.trigger = None
        if args.grow_when == "slope" and self.pending is not None:
            from . import SlopeTrigger, threshold_for

            # smooth_x: an evaluation dropped as a spike must not make the rule fire early (docs/schedule.md)
            self.trigger = SlopeTrigger(threshold_for(self.pending.op), n_params=n_params,
                                        batch_tokens=batch_tokens, smooth_x=True)
            for step, loss in state.get("slope_points", []):
                self.observe(step, loss)

    @property
    def pending(self) -> GrowthRequest | None:
        return self.requests[self.next] if self.next < len(self.requests) else None

    def observe(self, step: int, val_loss: float) -> None:
        if self.trigger is not None and self.pending is not None:
            self.points.append((step, val_loss))
            if self.trigger.update(step, val_loss):
                self.fired = True

    def due(self, iteration: int) -> GrowthRequest | None:
        """The growth to do now, if any (it counts as done once returned)."""
        req = self.pending
        if req is None or not (self.fired if req.iteration is None else iteration >= req.iteration):
            return None
        self.next += 1
        self.fired = False
        return req

    def grown(self, n_params: int) -> None:
        """After a growth: the slope rule starts a new curve for the new size and the next operator."""
        self.points = []
        if self.trigger is not None and self.pending is not None:
            from . import threshold_for

            self.trigger.reset(n_params)
            self.trigger.threshold = threshold_for(self.pending.op)

    def updates_left(self, args, step: int, iteration: int) -> tuple[int, bool]:
        """Updates until the step counter reaches --train_steps, counting the restarts of the counter by the
        growths still to come, and whether that is exact (a slope-rule growth's update is known only when it
        fires: the count is then a lower bound)."""
        counter, done = step, iteration
        for req in self.requests[self.next:]:
            if req.iteration is None:
                return done - iteration + max(0, args.train_steps - counter), False
            if counter + req.iteration - done > args.train_steps:
                break  # the run ends before this growth
            counter += req.iteration - done
            restart = restart_value(args.restart_steps if req.restart_step is None else req.restart_step,
                                    counter, req.op)
            counter, done = counter if restart is None else restart, req.iteration
        return done - iteration + max(0, args.train_steps - counter), True

    def state_dict(self) -> dict:
        return {"next_growth": self.next, "slope_points": list(self.points)}
