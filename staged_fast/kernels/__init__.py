"""Kernel selection for the model's hot ops: layer norm, causal attention, LM-head cross-entropy.

`--kernels torch` uses PyTorch (F.layer_norm, SDPA, F.cross_entropy); `--kernels triton` uses the fused
Triton kernels of this package (on CPU they run under TRITON_INTERPRET=1, slow, for checking);
`--kernels auto` picks Triton on CUDA and torch elsewhere. The Triton modules are imported lazily so
the torch path never needs Triton installed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("torch", "triton", "auto")


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Map a --kernels choice to the backend actually used on `device`."""
    if name not in BACKENDS:
        raise ValueError(f"Unknown --kernels {name!r}; choose one of {', '.join(BACKENDS)}.")
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    return name


def layer_norm(x, weight, bias, eps: float, backend: str = "torch"):
    if backend == "triton":
        from .layer_norm import layer_norm as triton_layer_norm

        return triton_layer_norm(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def causal_attention(q, k, v, dropout_p: float = 0.0, backend: str = "torch"):
    """Causal self-attention on (B, nh, T, hs) tensors, softmax scale 1/sqrt(hs)."""
    if backend == "triton":
        from .attention import flash_attention

        return flash_attention(q, k, v, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


def linear_cross_entropy(hidden, weight, targets, backend: str = "torch", ignore_index: int = -100):
    """Mean cross-entropy of logits = hidden @ weight.T against targets; hidden (N, d), targets (N,)."""
    if backend == "triton":
        from .linear_cross_entropy import fused_linear_cross_entropy

        return fused_linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index)
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
