"""Model configuration, the paper's presets, and the initial-LR heuristic."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the problem and the fix."""


@dataclass
class GPTConfig:
    n_layer: int = 12  # transformer blocks
    n_embd: int = 768  # hidden size d; FFN is 4d
    n_head: int = 8  # attention heads; head_dim = n_embd // n_head
    vocab_size: int = 50257  # GPT-2 BPE vocabulary
    n_positions: int = 1024  # learned position table length (max context)
    dropout: float = 0.1  # embedding and residual dropout (the seed's runs used 0.1)
    attn_dropout: float = 0.1  # dropout on attention probabilities
    layer_norm_eps: float = 1e-5  # as GPT-2 / HF

    def __post_init__(self):
        for name in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        if self.n_embd % self.n_head != 0:
            divisors = [h for h in range(1, 65) if self.n_embd % h == 0][-4:]
            raise ConfigError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: every head needs the "
                f"same head_dim. Pick an n_head that divides n_embd, e.g. one of {divisors} (the paper's "
                f"presets use head_dim 96)."
            )
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}.")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_params_non_embedding(self) -> int:
        """N of Kaplan et al.: 12 * n_layer * d^2 (attention 4d^2 + MLP 8d^2 per layer)."""
        return 12 * self.n_layer * self.n_embd**2

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def same_shape(self, other: "GPTConfig") -> bool:
        keys = ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    def shape_str(self) -> str:
        return f"{self.n_layer}L/{self.n_embd}d/{self.n_head}H"


# (n_layer, n_embd, n_head). The paper's presets keep head_dim 96; the CPU presets keep head_dim 64
# and come in halved variants so the default run can grow into them.
PRESETS: dict[str, tuple[int, int, int]] = {
    "GPT2_base": (12, 768, 8),
    "GPT2_base_div2_width": (12, 384, 4),
    "GPT2_base_div2_depth": (6, 768, 8),
    "GPT2_large": (24, 1536, 16),
    "GPT2_large_div2_width": (24, 768, 8),
    "GPT2_large_div2_depth": (12, 1536, 16),
    "GPT2_large_div4_width": (24, 384, 4),
    "GPT2_large_div4_depth": (6, 1536, 16),
    # CPU-sized presets for tests and the default run.
    "tiny": (2, 128, 2),
    "tiny_div2_width": (2, 64, 1),
    "tiny_div2_depth": (1, 128, 2),
    "small": (4, 256, 4),
    "small_div2_width": (4, 128, 2),
    "small_div2_depth": (2, 256, 4),
}


def preset_config(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ConfigError(
            f"Unknown model size {name!r}. Choose one of: {', '.join(PRESETS)}; "
            f"or give --n_layer/--n_embd/--n_head explicitly."
        )
    n_layer, n_embd, n_head = PRESETS[name]
    return GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, **overrides)


def preset_name(config: GPTConfig) -> str | None:
    """The preset whose shape matches `config`, or None."""
    for name, (n_layer, n_embd, n_head) in PRESETS.items():
        if (config.n_layer, config.n_embd, config.n_head) == (n_layer, n_embd, n_head):
            return name
    return None


def initial_lr(n_layer: int, n_embd: int) -> float:
    """The seed's LR heuristic: 0.003239 - 0.0001395 * log10(N), N = 12 * n_layer * d^2."""
    n_params = 12 * n_layer * n_embd**2
    return 0.003239 - 0.0001395 * math.log10(n_params)
