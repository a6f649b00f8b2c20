"""Function-preserving growth operators (Shen et al. 2022): width and depth doubling of a GPT and its
AdamW state. index_maps.py defines where every grown element comes from; reference.py builds it with
torch.cat; the fused C++/CUDA kernels (csrc/, via staged_fast.ops) write it in one pass; apply.py
grows a model + optimizer; checkpoint_growth.py a saved checkpoint. See docs/growth.md.
"""
from .apply import (
    GROWTH_OPS,
    GrowthError,
    check_target,
    grow_model,
    grown_config,
    growth_plan,
)
from .checkpoint_growth import STATE_ABSENT, grow_checkpoint, model_from_state, optimizer_from_state

__all__ = [
    "GROWTH_OPS",
    "GrowthError",
    "STATE_ABSENT",
    "check_target",
    "grow_checkpoint",
    "grow_model",
    "grown_config",
    "growth_plan",
    "model_from_state",
    "optimizer_from_state",
]
