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
    # --arch llama (staged_fast/llama.py): RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases.
    # The GPT-2 fields above keep their meaning (layer_norm_eps is the RMSNorm eps; n_positions the max context).
    arch: str = "gpt2"  # "gpt2" | "llama"
    n_kv_head: int = 0  # llama: key/value heads (0 = n_head); n_head must be a multiple
    intermediate_size: int = 0  # llama: SwiGLU hidden (0 = the multiple of 64 nearest 8/3 * n_embd)
    rope_theta: float = 10000.0  # llama: RoPE base
    tie_embeddings: bool = True  # LM head tied to the token embedding (GPT-2: untied only when imported so)
    # GPT-2 options of HF's GPT2Config (defaults = GPT-2; hf.py imports and exports them exactly):
    activation_function: str = "gelu_new"  # MLP activation, one of ACTIVATIONS (model.py)
    scale_attn_weights: bool = True  # attention scores * 1/sqrt(head_dim); False: unscaled
    scale_attn_by_inverse_layer_idx: bool = False  # scores additionally / (layer index + 1)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}.")
        self._check_gpt2_options()
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
        if self.arch == "llama":  # after the shared checks: its own (GQA, RoPE) divide by n_head and head_dim
            from .llama import check_llama_config

            check_llama_config(self)
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}.")

    def _check_gpt2_options(self) -> None:
        from .model import ACTIVATIONS

        if self.arch == "llama":
            changed = [f"{f}={getattr(self, f)!r}" for f, default in GPT2_OPTIONS.items() if getattr(self, f) != default]
            if changed:
                raise ConfigError(f"{', '.join(changed)} apply to --arch gpt2 only (llama has a SwiGLU MLP and "
                                  f"1/sqrt(head_dim) attention); leave them at their defaults.")
        elif self.activation_function not in ACTIVATIONS:
            raise ConfigError(f"activation_function={self.activation_function!r} is not supported; choose one of "
                              f"{', '.join(ACTIVATIONS)}.")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_params_non_embedding(self) -> int:
        """N of Kaplan et al.: 12 * n_layer * d^2 (attention 4d^2 + MLP 8d^2 per layer); llama: the
        matrices' exact count (q, k, v, o and gate, up, down per layer)."""
        if self.arch == "llama":
            from .llama import llama_non_embedding_params

            return llama_non_embedding_params(self)
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
        keys = ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "arch", "n_kv_head", "intermediate_size")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    def shape_str(self) -> str:
        if self.arch == "llama":
            return f"{self.n_layer}L/{self.n_embd}d/{self.n_head}H/{self.n_kv_head}KV/{self.intermediate_size}F"
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


ARCHS = ("gpt2", "llama")
# The GPT-2-only options and their defaults (a llama config keeps these).
GPT2_OPTIONS = {"activation_function": "gelu_new", "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}

# llama presets: (n_layer, n_embd, n_head, n_kv_head, intermediate_size). Each _div2_width halves d, heads,
# kv heads and the SwiGLU hidden, so width growth lands exactly on the full preset. The GPT2_base/large
# analogues keep those presets' layer counts, widths and head_dim 96 (hidden 8/3 d exactly).
LLAMA_PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "llama_tiny": (2, 128, 4, 2, 384),
    "llama_tiny_div2_width": (2, 64, 2, 1, 192),
    "llama_tiny_div2_depth": (1, 128, 4, 2, 384),
    "llama_small": (4, 256, 8, 4, 640),
    "llama_small_div2_width": (4, 128, 4, 2, 320),
    "llama_small_div2_depth": (2, 256, 8, 4, 640),
    "llama_base": (12, 768, 8, 4, 2048),
    "llama_base_div2_width": (12, 384, 4, 2, 1024),
    "llama_base_div2_depth": (6, 768, 8, 4, 2048),
    "llama_large": (24, 1536, 16, 8, 4096),
    "llama_large_div2_width": (24, 768, 8, 4, 2048),
    "llama_large_div2_depth": (12, 1536, 16, 8, 4096),
    "llama_large_div4_width": (24, 384, 4, 2, 1024),
    "llama_large_div4_depth": (6, 1536, 16, 8, 4096),
}


def preset_config(name: str, **overrides) -> GPTConfig:
    if name in LLAMA_PRESETS:
        n_layer, n_embd, n_head, n_kv_head, hidden = LLAMA_PRESETS[name]
        overrides = {k: v for k, v in overrides.items() if k != "arch"}
        return GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, arch="llama", n_kv_head=n_kv_head,
                         intermediate_size=hidden, **overrides)
    if name not in PRESETS:
        raise ConfigError(
            f"Unknown model size {name!r}. Choose one of: {', '.join(PRESETS)}, {', '.join(LLAMA_PRESETS)}; "
            f"or give --n_layer/--n_embd/--n_head explicitly."
        )
    n_layer, n_embd, n_head = PRESETS[name]
    return GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, **overrides)


def preset_name(config: GPTConfig) -> str | None:
    """The preset whose shape matches `config`, or None."""
    if config.arch == "llama":
        shape = (config.n_layer, config.n_embd, config.n_head, config.n_kv_head, config.intermediate_size)
        return next((name for name, dims in LLAMA_PRESETS.items() if dims == shape), None)
    for name, (n_layer, n_embd, n_head) in PRESETS.items():
        if (config.n_layer, config.n_embd, config.n_head) == (n_layer, n_embd, n_head):
            return name
    return None


def initial_lr_for(config: GPTConfig) -> float:
    """The seed's heuristic by non-embedding parameter count (GPT-2: exactly initial_lr(n_layer, n_embd))."""
    if config.arch == "gpt2":
        return initial_lr(config.n_layer, config.n_embd)
    return 0.003239 - 0.0001395 * math.log10(config.n_params_non_embedding)


def initial_lr(n_layer: int, n_embd: int) -> float:
    """The seed's LR heuristic: 0.003239 - 0.0001395 * log10(N), N = 12 * n_layer * d^2."""
    n_params = 12 * n_layer * n_embd**2
    return 0.003239 - 0.0001395 * math.log10(n_params)
