"""staged_fast: staged training of GPT-2-style language models (Shen et al. 2022), made fast.

Top-level names load lazily, so `python -m staged_fast.schedule` starts without importing torch.
"""
from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "GPTConfig": ".config",
    "PRESETS": ".config",
    "initial_lr": ".config",
    "preset_config": ".config",
    "GPT": ".model",
    "Llama": ".llama",
    "LLAMA_PRESETS": ".config",
    "initial_lr_for": ".config",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'staged_fast' has no attribute {name!r}")
