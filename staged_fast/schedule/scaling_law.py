"""Kaplan et al. (2020) scaling law in the form the staged-training authors used.

L(N, S) = (Nc / N)^aN + (2 Sc / S)^aS

Kaplan's eq. 1.6 is L(N, S) = (Nc / N)^aN + (Sc / Smin(S))^aS with Smin(S) = S / (1 + Bcrit / B). At the
critical batch size (B = Bcrit) Smin = S / 2, which gives the factor 2 above: S here counts optimizer
steps taken at the critical batch size. The paper's code (and DESIGN.md) use this form; so do we.
N is the non-embedding parameter count (12 * n_layer * d^2), L is in nats/token.

Compute C = 6 N B S (FLOPs, B in tokens per step). B enters only the compute, never the loss: the law
already assumes the critical batch; a run at another batch size moves along the same curve in steps
(an approximation, as in the authors' planner).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Kaplan et al. 2020, Table 5 (Appendix A).
N_C = 8.8e13  # Nc: parameter scale of the N term
ALPHA_N = 0.076  # aN
S_C = 2.1e3  # Sc: step scale of the S term (the law uses 2 * Sc, see the module docstring)
ALPHA_S = 0.76  # aS
B_STAR = 2.1e8  # B*: critical batch scale, tokens
ALPHA_B = 0.21  # aB: Bcrit(L) = B* / L^(1 / aB)

DEFAULT_BATCH_TOKENS = 512 * 1024  # the paper's runs: 512 sequences x 1024 tokens
OPTIMALITY_SLOPE = -0.052  # d log L / d log C at the "optimality point" (the paper's threshold)


def check_positive(**values: float) -> None:
    """Every value a finite number > 0 (a count of parameters, steps or tokens; a loss), or ValueError naming it."""
    for name, value in values.items():
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


@dataclass(frozen=True)
class ScalingLaw:
    """L(N, S) = (n_c / N)^alpha_n + (2 s_c / S)^alpha_s with given constants (default: Kaplan's).

    `KAPLAN` is the law the planner uses unless told otherwise; `compare.fit_law` fits the same form to
    real curves (docs/schedule.md, "The planner against the curves").
    """

    n_c: float = N_C
    alpha_n: float = ALPHA_N
    s_c: float = S_C
    alpha_s: float = ALPHA_S
    name: str = "kaplan"

    def param_term(self, n_params: float) -> float:
        """(Nc / N)^aN: the loss an infinitely long run of N parameters approaches."""
        check_positive(n_params=n_params)
        return (self.n_c / n_params) ** self.alpha_n

    def step_term(self, steps: float) -> float:
        """(2 Sc / S)^aS."""
        check_positive(steps=steps)
        return (2.0 * self.s_c / steps) ** self.alpha_s

    def loss(self, n_params: float, steps: float) -> float:
        """L(N, S), nats/token."""
        return self.param_term(n_params) + self.step_term(steps)

    def steps_to_loss(self, n_params: float, loss: float) -> float:
        """The inverse in S: S = 2 Sc / (L - (Nc/N)^aN)^(1/aS). Raises at or below the model's asymptote."""
        gap = loss - self.param_term(n_params)
        if not gap > 0:
            raise ValueError(
                f"A model with N={n_params:.4g} never reaches loss {loss:.4f} under the scaling law "
                f"(its asymptote is {self.param_term(n_params):.4f})."
            )
        return 2.0 * self.s_c / gap ** (1.0 / self.alpha_s)

    def slope(self, n_params: float, steps: float) -> float:
        """d log L / d log C along one model's curve: -aS (2Sc/S)^aS / L (N, B fixed)."""
        term = self.step_term(steps)
        return -self.alpha_s * term / (self.param_term(n_params) + term)

    def optimality_step(self, n_params: float, slope: float = OPTIMALITY_SLOPE) -> float:
        """The step at which slope(N, S) == `slope`: D = (2Sc/S)^aS = -slope A / (aS + slope)."""
        if not -self.alpha_s < slope < 0:
            raise ValueError(f"slope must be in ({-self.alpha_s}, 0), got {slope}.")
        d = -slope * self.param_term(n_params) / (self.alpha_s + slope)
        return 2.0 * self.s_c / d ** (1.0 / self.alpha_s)

    def to_dict(self) -> dict:
        return asdict(self)


KAPLAN = ScalingLaw()


def param_term(n_params: float) -> float:
    """(Nc / N)^aN: the loss an infinitely long run of N parameters approaches."""
    return KAPLAN.param_term(n_params)


def step_term(steps: float) -> float:
    """(2 Sc / S)^aS."""
    return KAPLAN.step_term(steps)


def loss_scaling_law(n_params: float, steps: float) -> float:
    """L(N, S) = (Nc/N)^aN + (2 Sc/S)^aS, nats/token."""
    return KAPLAN.loss(n_params, steps)


def steps_to_loss(n_params: float, loss: float) -> float:
    """The inverse in S: the steps at which a model of N parameters reaches `loss` under the law.

    S = 2 Sc / (L - (Nc/N)^aN)^(1/aS). Raises if the loss is at or below the model's asymptote.
    """
    return KAPLAN.steps_to_loss(n_params, loss)


def critical_batch(loss: float) -> float:
    """Bcrit(L) = B* / L^(1/aB), tokens per step."""
    check_positive(loss=loss)
    return B_STAR / loss ** (1.0 / ALPHA_B)


def compute(n_params: float, batch_tokens: float, steps: float) -> float:
    """C = 6 N B S, FLOPs (forward + backward, non-embedding)."""
    return 6.0 * n_params * batch_tokens * steps


def loss_slope(n_params: float, steps: float) -> float:
    """d log L / d log C along one model's curve (N, B fixed, so d log C = d log S).

    d log L / d log S = -aS (2Sc/S)^aS / L; the base of the logarithms cancels.
    """
    return KAPLAN.slope(n_params, steps)


def optimality_step(n_params: float, slope: float = OPTIMALITY_SLOPE) -> float:
    """The step at which loss_slope(N, S) == slope (the law's version of the slope rule).

    Solving -aS D / (A + D) = slope for D = (2Sc/S)^aS gives D = -slope A / (aS + slope).
    """
    return KAPLAN.optimality_step(n_params, slope)


def law_summary(n_params: float, steps: float, batch_tokens: float = DEFAULT_BATCH_TOKENS) -> dict:
    """Everything the `law` subcommand prints, as one dict."""
    check_positive(n_params=n_params, steps=steps, batch_tokens=batch_tokens)
    loss = loss_scaling_law(n_params, steps)
    s_opt = optimality_step(n_params)
    return {
        "n_params": n_params,
        "steps": steps,
        "batch_tokens": batch_tokens,
        "loss": loss,
        "critical_batch_tokens": critical_batch(loss),
        "compute_flops": compute(n_params, batch_tokens, steps),
        "slope": loss_slope(n_params, steps),
        "optimality_step": s_opt,
        "optimality_loss": loss_scaling_law(n_params, s_opt),
        "asymptote": param_term(n_params),
        "log10_compute": math.log10(compute(n_params, batch_tokens, steps)),
    }
