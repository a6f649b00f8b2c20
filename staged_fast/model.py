"""GPT-2: pre-LN blocks, learned positions, tied embeddings, tanh-GELU.

HF GPT2Config's options are honoured exactly (config.py): the MLP activation (`activation_function`, ACTIVATIONS
below, numerically as transformers' ACT2FN), unscaled attention (`scale_attn_weights=False`), scores divided by
layer index + 1 (`scale_attn_by_inverse_layer_idx`) and an untied LM head (`tie_embeddings=False`).

Parameter names follow HF's GPT2LMHeadModel (transformer.wte, h.{i}.attn.c_attn, ...) so checkpoints
map one to one; linear weights are nn.Linear's (out, in), HF's Conv1D stores the transpose.
The model is written for one device; DDP/FSDP are applied from outside (staged_fast.distributed).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .activation_checkpointing import checkpointed
from .kernels import cpu_linear_ce
from .config import GPTConfig


def _tanh_gelu(x):
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


# HF activation_function name -> function. gelu_new, gelu_pytorch_tanh and gelu_fast are the same tanh
# approximation (HF writes it out; the results agree to float rounding); gelu is the exact erf GELU.
ACTIVATIONS = {
    "gelu_new": _tanh_gelu,
    "gelu_pytorch_tanh": _tanh_gelu,
    "gelu_fast": _tanh_gelu,
    "gelu": F.gelu,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def attention_scale(config: GPTConfig, layer_idx: int) -> float | None:
    """The softmax scale of layer `layer_idx` as HF GPT-2 computes it; None for the default 1/sqrt(head_dim)
    (so the default path calls the attention kernels exactly as before)."""
    if config.scale_attn_weights and not config.scale_attn_by_inverse_layer_idx:
        return None
    scale = config.head_dim**-0.5 if config.scale_attn_weights else 1.0
    return scale / float(layer_idx + 1) if config.scale_attn_by_inverse_layer_idx else scale


class LayerNorm(nn.Module):
    def __init__(self, n_embd: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd))
        self.eps = eps
        self.backend = "torch"

    def forward(self, x):
        return kernels.layer_norm(x, self.weight, self.bias, self.eps, self.backend)

    def forward_residual(self, x, residual):
        """(norm(x + residual), x + residual), one memory pass on the Triton path."""
        return kernels.layer_norm_residual(x, residual, self.weight, self.bias, self.eps, self.backend)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.n_head = config.n_head
        self.scale = attention_scale(config, layer_idx)  # None: 1/sqrt(head_dim)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v stacked along out
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = config.attn_dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.backend = "torch"

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.attn_dropout if self.training else 0.0
        if self.scale is not None:  # both backends apply 1/sqrt(hs): fold the rest into q (the same scores)
            q = q * (self.scale * (C // self.n_head) ** 0.5)
        y = kernels.causal_attention(q, k, v, dropout_p=p, backend=self.backend)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.act = ACTIVATIONS[config.activation_function]

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x):
        h, x = self.ln_2.forward_residual(self.attn(self.ln_1(x)), x)  # x += attn(...); h = ln_2(x)
        return x + self.mlp(h)


class GPT(nn.Module):
    def __new__(cls, config: GPTConfig | None = None, *args, **kwargs):
        # GPT(config) builds the config's family: a llama config gives a staged_fast.llama.Llama (a GPT
        # subclass), so every caller that builds a model from a config serves both families.
        if cls is GPT and getattr(config, "arch", "gpt2") == "llama":
            from .llama import Llama

            cls = Llama
        return super().__new__(cls)

    def __init__(self, config: GPTConfig, kernels_backend: str = "torch"):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=LayerNorm(config.n_embd, config.layer_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT-2
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections (1/sqrt(2 * n_layer)).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.set_kernels(kernels_backend)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # --activation_checkpointing N: recompute every N-th block in the backward (1: every block; 0/False: none). A
    # training setting, not part of the config (the trainer sets it on every model it trains, a grown one
    # included); a class default, as llama builds its own layers
    activation_checkpointing = 0
    activation_checkpointing_policy = "full"  # --ac_policy: what a checkpointed block keeps (activation_checkpointing.py)
    kernel_modules = (LayerNorm, CausalSelfAttention)  # the layers whose ops set_kernels switches
    attention_modules = (CausalSelfAttention,)  # what 'triton_sdpa' leaves on PyTorch (SDPA)

    def set_kernels(self, backend: str) -> None:
        """Select 'torch' or 'triton' ops for every layer norm, attention and the LM-head loss; 'triton_sdpa':
        the Triton ops with attention on SDPA (a head_dim the flash kernel is not built for)."""
        if backend not in kernels.MODEL_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(kernels.MODEL_BACKENDS)} (resolve 'auto' first), "
                             f"got {backend!r}")
        self.kernels_backend = backend
        if self.ops_backend == "triton":
            kernels.preload_triton()
        for m in self.modules():
            if isinstance(m, self.kernel_modules):
                sdpa = backend == kernels.TRITON_SDPA and isinstance(m, self.attention_modules)
                m.backend = "torch" if sdpa else self.ops_backend

    @property
    def ops_backend(self) -> str:
        """'torch' or 'triton': the backend of every op but attention (the LM-head loss, the norms)."""
        return "torch" if self.kernels_backend == "torch" else "triton"

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def _check_length(self, T: int) -> None:
        if T > self.config.n_positions:
            raise ValueError(
                f"sequence length {T} exceeds n_positions={self.config.n_positions} (the model's max context); "
                f"use a shorter --seqlen or a model with more positions."
            )

    def token_embeddings(self, idx, head_link=None):
        """wte(idx); with `head_link` (CPU training, tied head) its gradient goes into the head's in place."""
        if head_link is None:
            return self.transformer.wte(idx)
        return cpu_linear_ce.tied_embedding(self.transformer.wte.weight, idx, head_link)

    def hidden_states(self, idx, head_link=None):
        """Final-layer-normed hidden states, (B, T, d)."""
        B, T = idx.shape
        self._check_length(T)
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.token_embeddings(idx, head_link) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = self.run_block(i, block, x)
        return self.transformer.ln_f(x)

    def run_block(self, index: int, block, x, *args):
        """Block `index`; when activation checkpointing selects it (training with grad) only its input (and under
        the matmuls policy its matmul and attention outputs) is kept and the rest is recomputed in the backward:
        torch's non-reentrant checkpoint restores the RNG first, so dropout, the Triton attention's seed
        included, draws the same masks."""
        every = int(self.activation_checkpointing)
        if every > 0 and index % every == 0 and self.training and torch.is_grad_enabled():
            return checkpointed(block, x, *args, policy=self.activation_checkpointing_policy)
        return block(x, *args)

    def forward(self, idx, targets=None):
        """Logits (B, T, V) when targets is None, else the mean next-token loss (a scalar).

        With targets the LM head and the loss are one op, so the Triton backend never materializes
        the (B*T, V) logits.
        """
        weight = self.lm_head.weight
        # CPU training with GPT-2's tied embedding: one gradient buffer for both uses of the weight
        link = (cpu_linear_ce.HeadGradLink() if targets is not None and self.kernels_backend == "torch"
                and self.config.tie_embeddings and cpu_linear_ce.tied_eligible(weight) else None)
        h = self.hidden_states(idx, link)
        if targets is None:
            return self.lm_head(h)
        return kernels.linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), backend=self.ops_backend, head_link=link
        )
