"""Learning-rate schedule: linear warmup, then linear (the seed's) or cosine decay to `min_lr` at
`train_steps`, or warmup-stable-decay (`wsd`: the peak held until the last `decay_fraction` of the run, then
a linear decay to `min_lr`; a growth in the stable phase meets the same LR whenever it happens); after a
growth, an optional restart ramp.

The LR is a pure function of the optimizer-step counter, so resuming is exact and a growth only has to
move the counter (`--restart_steps R`) and set the ramp (`--restart_warmup_steps Wr`): from step R the
LR rises linearly from 0 to the normal schedule's value at R + Wr, then follows the normal schedule.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

DECAYS = ("linear", "cosine", "wsd")


@dataclass
class LRSchedule:
    base_lr: float
    warmup_steps: int
    train_steps: int
    decay: str = "linear"  # "linear" (the seed's), "cosine" or "wsd"
    min_lr: float = 0.0
    restart_step: int | None = None  # counter value set at the last growth (R)
    restart_warmup_steps: int = 0  # Wr
    decay_fraction: float = 0.2  # wsd: the share of train_steps spent decaying (a saved state without it: 0.2)

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ValueError(f"--lr_decay must be one of {', '.join(DECAYS)}, got {self.decay!r}")
        if self.train_steps <= 0 or self.warmup_steps < 0:
            raise ValueError("train_steps must be positive and warmup_steps non-negative")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"--decay_fraction must be in (0, 1], got {self.decay_fraction}: it is the share of "
                             f"--train_steps over which --lr_decay wsd decays the LR")

    def base(self, step: int) -> float:
        """The schedule without any restart ramp; `step` = optimizer steps already taken."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if step >= self.train_steps:
            return self.min_lr
        if self.decay == "wsd":
            decay_start = max(self.warmup_steps, self.train_steps - round(self.decay_fraction * self.train_steps))
            if step < decay_start:
                return self.base_lr
            progress = (step - decay_start) / max(1, self.train_steps - decay_start)
            return self.min_lr + (self.base_lr - self.min_lr) * (1.0 - progress)
        span = max(1, self.train_steps - self.warmup_steps)
        progress = (step - self.warmup_steps) / span
        if self.decay == "linear":
            return self.min_lr + (self.base_lr - self.min_lr) * (1.0 - progress)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        r, wr = self.restart_step, self.restart_warmup_steps
        if r is not None and wr > 0 and r <= step < r + wr:
            return self.base(r + wr) * (step - r) / wr
        return self.base(step)

    def restart(self, step: int, warmup_steps: int) -> None:
        """Record a growth that set the step counter to `step`, ramping the LR over `warmup_steps`."""
        self.restart_step = step
        self.restart_warmup_steps = warmup_steps

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "LRSchedule":
        return cls(**state)
