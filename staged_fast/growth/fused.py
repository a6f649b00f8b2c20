"""The tensor-level growth op: `torch.ops.staged_fast.grow_tiles_` from the C++/CUDA extension
staged_fast._C (csrc/), one pass per parameter writing its grown value and grown Adam state straight
into preallocated destinations, with the PyTorch reference (growth/reference.py) as its fallback.

The layer below the model-level operators (growth/apply.py) and below the public `staged_fast.ops`,
which re-exports it: imports run one way, ops -> growth.apply -> growth.fused. When the extension is
not built (or was built without CUDA and the tensors are on a GPU) the functions run the reference and
log that once; backend="fused" makes that a hard error, backend="reference" forces the reference.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from .index_maps import Tiling
from .reference import grow_tensor_reference, grow_tiles_reference

log = logging.getLogger("staged_fast.ops")
BACKENDS = ("auto", "fused", "reference")
_ext_state: dict = {}


def _load_extension() -> bool:
    if "ok" not in _ext_state:
        try:
            from .. import _C  # noqa: F401  (loads the TORCH_LIBRARY registrations)

            _ext_state["ok"] = True
            _ext_state["cuda"] = bool(getattr(_C, "with_cuda", False))
            try:  # shape propagation for torch.compile / FakeTensor: the op only mutates its dst inputs
                torch.library.register_fake("staged_fast::grow_tiles_")(lambda *args, **kwargs: None)
            except RuntimeError:  # already registered (module reloaded)
                pass
        except ImportError as e:
            _ext_state["ok"] = False
            _ext_state["error"] = str(e)
    return _ext_state["ok"]


def extension_available(device: torch.device | str = "cpu") -> bool:
    """Whether the fused kernels of staged_fast._C can run on `device`."""
    if not _load_extension():
        return False
    kind = torch.device(device).type
    return kind == "cpu" or (kind == "cuda" and _ext_state["cuda"])


def _warn_once(key: str, message: str) -> None:
    if key not in _ext_state:
        _ext_state[key] = True
        log.warning(message)


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """'fused' or 'reference' for `device`; 'auto' falls back to the reference (logged once)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown growth backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "reference":
        return backend
    if extension_available(device):
        return "fused"
    why = _ext_state.get("error") or f"it was built without {torch.device(device).type.upper()} kernels"
    if backend == "fused":
        raise RuntimeError(
            f"backend='fused' but the extension staged_fast._C cannot run on {device}: {why}. "
            f"Build it with `pip install --no-build-isolation -e .` (see docs/growth.md)."
        )
    _warn_once(f"fallback-{torch.device(device).type}", f"staged_fast._C unavailable ({why}); growth runs the "
               f"PyTorch reference on {torch.device(device).type} (correct, slower, more memory).")
    return "reference"


def grow_tiles_(
    srcs: Sequence[torch.Tensor],
    dsts: Sequence[torch.Tensor],
    scales: Sequence[float],
    tiling: Tiling,
    noise: torch.Tensor | None = None,
    *,
    rows: tuple[int, int] | None = None,
    backend: str = "auto",
) -> None:
    """Write the grown form of each srcs[i] (times scales[i]) into the preallocated dsts[i].

    srcs/dsts: 1 to 4 contiguous tensors (param, exp_avg, exp_avg_sq[, max_exp_avg_sq]); noise: float32
    (groups, row_halves, rows, cols), applied to the first tensor only (its block rows become [W - E, E]).
    rows: (begin, end) of the destination viewed as 2-D (tiling.dst_rows x tiling.dst_cols): each dsts[i]
    then holds only those rows (one rank's shard, staged_fast.sharded); srcs and noise stay whole.
    """
    if resolve_backend(backend, dsts[0].device) == "fused":
        begin, end = (0, None) if rows is None else rows
        torch.ops.staged_fast.grow_tiles_(list(srcs), list(dsts), [float(s) for s in scales], *tiling.as_args(), noise,
                                          begin, end)
    else:
        grow_tiles_reference(srcs, dsts, scales, tiling, noise, rows)


def grow_tensor(
    src: torch.Tensor, tiling: Tiling, scale: float = 1.0, noise: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """The grown tensor of `src` (flat; reshape to the rule's dst_shape)."""
    if resolve_backend(backend, src.device) == "reference":
        return grow_tensor_reference(src, tiling, scale, noise)
    out = torch.empty(tiling.dst_numel, dtype=src.dtype, device=src.device)
    grow_tiles_([src.contiguous()], [out], [scale], tiling, noise, backend="fused")
    return out
