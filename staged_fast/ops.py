"""Public growth ops: model-level `grow_width` / `grow_depth`, and the tensor-level fused op.

The fused op is `torch.ops.staged_fast.grow_tiles_` from the C++/CUDA extension staged_fast._C
(csrc/): one pass per parameter writes its grown value and grown Adam state straight into
preallocated destinations. When the extension is not built (or was built without CUDA and the tensors
are on a GPU) the same functions run the PyTorch reference (staged_fast.growth.reference) and log
that once. backend="fused" makes that a hard error instead, backend="reference" forces the reference.
The tensor-level functions live in staged_fast.growth.fused (below the model-level operators); this
module re-exports them beside the model-level ones, so imports run one way: ops -> growth.
"""
from __future__ import annotations

from .growth import grow_model
from .growth.fused import BACKENDS, extension_available, grow_tensor, grow_tiles_, resolve_backend

__all__ = ["BACKENDS", "extension_available", "grow_depth", "grow_tensor", "grow_tiles_", "grow_width",
           "resolve_backend"]


def grow_width(model, optimizer=None, **kwargs):
    """Double the width of `model` (and its AdamW state); see staged_fast.growth.grow_model."""
    return grow_model(model, optimizer, "width", **kwargs)


def grow_depth(model, optimizer=None, mode: str = "alternate_id", **kwargs):
    """Double the depth of `model` (and its AdamW state) with `mode`; see staged_fast.growth.grow_model."""
    return grow_model(model, optimizer, mode, **kwargs)
