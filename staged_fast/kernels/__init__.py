"""Kernel selection for the model's hot ops: layer norm, causal attention, LM-head cross-entropy, and for
the llama family RMSNorm (+ residual) and SwiGLU.

`--kernels torch` uses PyTorch (F.layer_norm, SDPA, F.cross_entropy); `--kernels triton` uses the fused
Triton kernels of this package (on CPU they run under TRITON_INTERPRET=1, slow, for checking);
`--kernels auto` picks Triton on CUDA (attention on SDPA for a model whose head_dim the flash kernel is not
built for: `backend_for_head_dim`) and torch elsewhere. On CPU the torch backend trains the LM-head loss
through `cpu_linear_ce` (the same math in plain PyTorch ops, laid out for MKL: transposed logits made and
exponentiated in vocabulary blocks, a tied embedding's gradient added into the head's in place). The Triton modules are imported lazily so
the torch path never needs Triton installed.

Routing rules of the triton backend (no silent fallbacks):
- CPU tensors: Triton decides at import time whether a kernel is compiled or interpreted, so the first
  triton call on CPU sets TRITON_INTERPRET=1 (with a one-time warning) before importing the kernel
  modules. If they were already imported compiled for CUDA, a CPU call raises with the fix.
- Attention dropout (config.attn_dropout, on in training) is done inside the Triton kernel (Philox,
  seeded from torch's RNG); its mask differs from SDPA's, so the two backends agree only in expectation.
- Shapes a kernel cannot serve raise ValueError naming the limit (attention head_dim must be one of
  16/32/64/96/128; layer-norm hidden at most 16384).
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import sys
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("torch", "triton", "auto")
# What a model runs (GPT.set_kernels): the two backends, and the Triton ops with attention on SDPA, which
# --kernels auto picks on CUDA for a head_dim the flash kernel is not built for.
TRITON_SDPA = "triton_sdpa"
MODEL_BACKENDS = ("torch", "triton", TRITON_SDPA)
# How the flash attention backward computes dQ (STAGED_FAST_ATTN_DQ; attention.DQ_MODE): fp32 atomic adds
# from the dK/dV kernel (default), or a separate dQ kernel whose result is the same bits on every run.
DQ_MODES = ("atomic", "split")

# Here, not in _common: importing _common fixes whether the kernels are interpreted, and the model imports this.
_THROUGH_OPS = contextvars.ContextVar("staged_fast_kernels_through_ops", default=False)


@contextlib.contextmanager
def through_torch_ops():
    """Within this context the attention launches through its torch.library op in eager mode too. A
    TorchDispatchMode (selective activation checkpointing's) sees that op as one call it can keep, while the
    launches inside the eager autograd.Function are invisible to it; the Function stays the eager default, as
    the op's dispatch costs host time (benchmarks/RESULTS.md)."""
    token = _THROUGH_OPS.set(True)
    try:
        yield
    finally:
        _THROUGH_OPS.reset(token)


def launch_through_ops() -> bool:
    """Whether a fused op goes through its torch.library op: under torch.compile, or in through_torch_ops()."""
    return torch.compiler.is_compiling() or _THROUGH_OPS.get()


def check_dq_mode(mode: str) -> str:
    """`mode` if it is one of DQ_MODES, else a ValueError naming the variable and the choices."""
    if mode not in DQ_MODES:
        raise ValueError(f"STAGED_FAST_ATTN_DQ={mode!r}: the attention backward's dQ mode is one of "
                         f"{', '.join(DQ_MODES)} (split: deterministic, as --deterministic selects); set one of them "
                         f"or unset it.")
    return mode


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Map a --kernels choice to the backend actually used on `device`."""
    if name not in BACKENDS:
        raise ValueError(f"Unknown --kernels {name!r}; choose one of {', '.join(BACKENDS)}.")
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    if name == "triton" and torch.device(device).type == "cpu":
        _enable_interpreter()
    return name


# The head_dims the flash attention kernel is built for (attention.HEAD_DIMS): here, so that a model can be
# checked before Triton is imported.
FLASH_HEAD_DIMS = (16, 32, 64, 96, 128)


def backend_for_head_dim(requested: str, resolved: str, head_dim: int, log=print) -> str:
    """The backend for a model of this head_dim: the resolved one when the flash kernel is built for it; else
    under --kernels auto the Triton ops with attention on SDPA (logged), and for an explicit --kernels
    triton a ValueError naming the fix."""
    if resolved != "triton" or head_dim in FLASH_HEAD_DIMS:
        return resolved
    dims = ", ".join(map(str, FLASH_HEAD_DIMS))
    if requested == "auto":
        log(f"--kernels auto: head_dim {head_dim} is not one the flash attention kernel is built for ({dims}); "
            f"attention runs PyTorch's SDPA, the other Triton kernels stay")
        return TRITON_SDPA
    raise ValueError(f"--kernels triton: the flash attention kernel is built for head_dim {dims}, and this model's "
                     f"is {head_dim} (n_embd / n_head). Fix: pick n_head so that n_embd / n_head is one of them, or use "
                     f"--kernels torch (or auto).")


def _enable_interpreter() -> None:
    """Triton fixes interpreted vs compiled when `triton.language` is imported (its own tl.sum etc. are
    jit functions), so the switch must come before anything imports triton (torch's fused AdamW does)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return
    if "triton.language" in sys.modules:
        raise RuntimeError(
            "--kernels triton on CPU needs Triton's interpreter, but Triton was already imported in compiled "
            "mode by this process. Set TRITON_INTERPRET=1 in the environment before starting it."
        )
    warnings.warn("--kernels triton on CPU: running the Triton kernels under TRITON_INTERPRET=1 (slow, for checking).")
    os.environ["TRITON_INTERPRET"] = "1"


TRITON_MODULES = ("layernorm", "attention", "fused_linear_ce", "rmsnorm", "fused_swiglu", "rope")
_LOADED: dict[str, object] = {}


def _triton_module(name: str, device: torch.device):
    """staged_fast.kernels.<name>; on CPU enable the Triton interpreter before the first import. A plain
    dict lookup once loaded, so torch.compile traces through it (an import would break the graph)."""
    module = _LOADED.get(name)
    if module is None:
        if device.type == "cpu":
            _enable_interpreter()
        module = _LOADED[name] = importlib.import_module(f"{__name__}.{name}")
    return module


def preload_triton() -> None:
    """Import the Triton kernel modules now (GPT.set_kernels("triton") calls this), so the first forward,
    which torch.compile may be tracing, finds them loaded. Compiled for the GPU where CUDA is available,
    else under the interpreter."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in TRITON_MODULES:
        _triton_module(name, device)


def layer_norm(x, weight, bias, eps: float, backend: str = "torch"):
    if backend == "triton":
        return _triton_module("layernorm", x.device).layer_norm(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layer_norm_residual(x, residual, weight, bias, eps: float, backend: str = "torch"):
    """(LayerNorm(x + residual), x + residual): the residual add fused into the norm on the Triton path."""
    if backend == "triton":
        return _triton_module("layernorm", x.device).layer_norm_residual(x, residual, weight, bias, eps)
    s = x + residual
    return F.layer_norm(s, (s.shape[-1],), weight, bias, eps), s


def rms_norm(x, weight, eps: float, backend: str = "torch"):
    """RMSNorm over the last dim (llama); torch: staged_fast.llama.rms_norm (statistics in fp32)."""
    if backend == "triton":
        return _triton_module("rmsnorm", x.device).rms_norm(x, weight, eps)
    from ..llama import rms_norm as torch_rms_norm

    return torch_rms_norm(x, weight, eps)


def rms_norm_residual(x, residual, weight, eps: float, backend: str = "torch"):
    """(RMSNorm(x + residual), x + residual): the residual add fused into the norm on the Triton path."""
    if backend == "triton":
        return _triton_module("rmsnorm", x.device).rms_norm_residual(x, residual, weight, eps)
    from ..llama import rms_norm as torch_rms_norm

    s = x + residual
    return torch_rms_norm(s, weight, eps), s


def swiglu(gate, up, backend: str = "torch"):
    """silu(gate) * up (llama's MLP activation), one fused kernel on the Triton path."""
    if backend == "triton":
        return _triton_module("fused_swiglu", gate.device).swiglu(gate, up)
    return F.silu(gate) * up


def rope_torch(x, cos, sin):
    """The PyTorch RoPE (rotate-half layout) of apply_rope / apply_rope_qk's torch path, in x's dtype."""
    half = x.shape[-1] // 2
    c = torch.cat((cos, cos), dim=-1)[None, :, None, :]
    s = torch.cat((sin, sin), dim=-1)[None, :, None, :]
    return x * c + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * s


def apply_rope(x, cos, sin, backend: str = "torch"):
    """RoPE (rotate-half layout) on x (B, T, H, head_dim) with cos/sin (T, head_dim / 2); one kernel on the
    Triton path."""
    if backend == "triton":
        return _triton_module("rope", x.device).rope(x, cos, sin)
    return rope_torch(x, cos, sin)


def apply_rope_qk(q, k, cos, sin, backend: str = "torch"):
    """(q_rot, k_rot): RoPE on q (B, T, n_head, head_dim) and k (B, T, n_kv_head, head_dim), any strides, with
    cos/sin (T, head_dim / 2). Triton: one fused kernel launch for both tensors (one for the backward);
    torch: rope_torch on each tensor."""
    if backend == "triton":
        return _triton_module("rope", q.device).rope_qk(q, k, cos, sin)
    return rope_torch(q, cos, sin), rope_torch(k, cos, sin)


def causal_attention(q, k, v, dropout_p: float = 0.0, backend: str = "torch"):
    """Causal self-attention on (B, nh, T, hs) tensors, softmax scale 1/sqrt(hs). k and v may have fewer
    heads than q (grouped-query attention, n_kv dividing nh, kv head j serving q heads j*r .. j*r+r-1):
    both backends read them as they are, nothing repeated (SDPA with enable_gqa; the Triton kernel
    indexes kv head h // r and returns dk, dv with k's shape). The Triton path raises ValueError when
    nh is not a multiple of n_kv."""
    if backend == "triton":
        return _triton_module("attention", q.device).flash_attention(q, k, v, dropout_p=dropout_p)
    if k.shape[1] != q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


def linear_cross_entropy(hidden, weight, targets, backend: str = "torch", ignore_index: int = -100, head_link=None):
    """Mean cross-entropy of logits = hidden @ weight.T against targets; hidden (N, d), targets (N,).
    head_link: the tied embedding's cpu_linear_ce.HeadGradLink, handed the weight gradient on the CPU path (a
    tied embedding whose link is never fed makes its own dense gradient)."""
    if backend == "triton":
        module = _triton_module("fused_linear_ce", hidden.device)
        return module.fused_linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index)
    from . import cpu_linear_ce

    if cpu_linear_ce.eligible(hidden, weight):  # CPU training: transposed logits in vocabulary blocks
        return cpu_linear_ce.linear_cross_entropy_cpu(hidden, weight, targets, ignore_index, link=head_link)
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
