"""staged_fast: staged training of GPT-2-style language models (Shen et al. 2022), made fast."""
from .config import GPTConfig, PRESETS, initial_lr, preset_config
from .model import GPT

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "PRESETS", "initial_lr", "preset_config", "__version__"]
