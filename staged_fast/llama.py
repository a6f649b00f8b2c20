"""Llama-style decoder (`--arch llama`): RMSNorm pre-norm, SwiGLU MLP, RoPE on q and k, grouped-query
attention, no biases, tied or untied embeddings, no learned positions.

Parameter names follow our GPT's layout (transformer.wte, transformer.h.{i}.ln_1, attn.*, ln_2, mlp.*,
transformer.ln_f, lm_head) so the growth machinery (index maps, fused op, depth modes, checkpoints)
serves both families unchanged; `attn.c_proj` (o_proj) and `mlp.c_proj` (down_proj) keep GPT-2's names so
an inserted `_id` layer zeroes exactly the two residual-branch outputs. staged_fast/hf_llama.py maps the
names to transformers' LlamaForCausalLM.

`GPT(config)` with `config.arch == "llama"` builds a `Llama` (a GPT subclass, see GPT.__new__), so every
place that builds a model from a config (trainer, checkpoints, growth, evaluation) needs no change.

Attention runs through kernels.causal_attention: SDPA reads the n_kv_head K/V heads as they are
(enable_gqa, nothing repeated); so does the Triton flash kernel (q head h reads kv head h // r; the dK/dV
program of a kv head sums over its r query heads in registers). RoPE is applied to q and k before attention
by one fused op (kernels.apply_rope_qk: with --kernels triton one launch covers both tensors each way, reading
the projections' strided views). RMSNorm (+ residual) and SwiGLU use the Triton kernels of kernels/rmsnorm.py
and kernels/fused_swiglu.py with --kernels triton.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .config import ConfigError, GPTConfig
from .model import GPT


def default_intermediate_size(n_embd: int) -> int:
    """The multiple of 64 nearest 8/3 * n_embd (at least 64)."""
    return max(64, 64 * round(8 * n_embd / 3 / 64))


def check_llama_config(config: GPTConfig) -> None:
    """Fill the llama defaults (n_kv_head, intermediate_size) and validate them; called by GPTConfig."""
    if config.n_kv_head in (0, None):
        config.n_kv_head = config.n_head
    if config.intermediate_size in (0, None):
        config.intermediate_size = default_intermediate_size(config.n_embd)
    for name in ("n_kv_head", "intermediate_size"):
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    if config.n_head % config.n_kv_head != 0:
        options = [k for k in range(1, config.n_head + 1) if config.n_head % k == 0]
        raise ConfigError(f"n_head={config.n_head} is not a multiple of n_kv_head={config.n_kv_head}: each key/value "
                          f"head serves the same number of query heads. Pick n_kv_head from {options}.")
    if config.head_dim % 2 != 0:
        raise ConfigError(f"head_dim={config.head_dim} is odd; RoPE rotates pairs of dimensions. Pick an n_head "
                          f"that makes n_embd / n_head even.")
    if not config.rope_theta > 0:
        raise ConfigError(f"rope_theta must be positive, got {config.rope_theta}.")


def llama_non_embedding_params(config: GPTConfig) -> int:
    d, hd = config.n_embd, config.head_dim
    attn = d * config.n_head * hd * 2 + d * config.n_kv_head * hd * 2  # q, o; k, v
    mlp = 3 * d * config.intermediate_size
    return config.n_layer * (attn + mlp + 2 * d) + d


# ------------------------------------------------------------------------------------------ ops
def rms_norm(x, weight, eps: float):
    """weight * x / sqrt(mean(x^2) + eps), computed in fp32 (fp64 for fp64; as HF's LlamaRMSNorm), returned in
    x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype) if weight.dtype == x.dtype else (weight.float() * y).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype):
    """cos, sin of shape (T, head_dim), the rotate-half layout of HF Llama (frequencies repeated twice)."""
    acc = torch.promote_types(dtype, torch.float32)  # fp32 as HF, fp64 for fp64 models
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).to(acc)
                                / head_dim))
    freqs = positions.to(acc)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ------------------------------------------------------------------------------------------ modules
class RMSNorm(nn.Module):
    def __init__(self, n_embd: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.eps = eps
        self.backend = "torch"

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps, self.backend)

    def forward_residual(self, x, residual):
        """(norm(x + residual), x + residual), one memory pass on the Triton path."""
        return kernels.rms_norm_residual(x, residual, self.weight, self.eps, self.backend)


class LlamaAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        d, hd = config.n_embd, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, hd
        self.rope_theta = config.rope_theta
        self.q_proj = nn.Linear(d, config.n_head * hd, bias=False)
        self.k_proj = nn.Linear(d, config.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(d, config.n_kv_head * hd, bias=False)
        self.c_proj = nn.Linear(config.n_head * hd, d, bias=False)  # o_proj
        self.attn_dropout = config.attn_dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.backend = "torch"

    def qkv(self, x, positions):
        """q (B, nh, T, hs), k and v (B, n_kv, T, hs), RoPE applied to q and k at `positions` (one fused op,
        kernels.apply_rope_qk: one Triton launch for both tensors each way with --kernels triton)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, q.dtype)
        half = self.head_dim // 2
        cos, sin = cos[:, :half], sin[:, :half]  # the two halves repeat the same frequencies
        q, k = kernels.apply_rope_qk(q, k, cos, sin, self.backend)
        return q.transpose(1, 2), k.transpose(1, 2), v

    def forward(self, x, positions):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, positions)
        p = self.attn_dropout if self.training else 0.0
        y = kernels.causal_attention(q, k, v, dropout_p=p, backend=self.backend)  # GQA: k, v have n_kv heads
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


class SwiGLU(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        d, f = config.n_embd, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.c_proj = nn.Linear(f, d, bias=False)  # down_proj
        self.dropout = nn.Dropout(config.dropout)
        self.backend = "torch"

    def forward(self, x):
        return self.dropout(self.c_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x), self.backend)))


class LlamaBlock(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.layer_norm_eps)
        self.attn = LlamaAttention(config)
        self.ln_2 = RMSNorm(config.n_embd, config.layer_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, positions):
        h, x = self.ln_2.forward_residual(self.attn(self.ln_1(x), positions), x)  # x += attn(...); h = ln_2(x)
        return x + self.mlp(h)


class Llama(GPT):
    """The llama family; GPT's forward (fused LM-head loss) and hidden_states contract are kept."""

    kernel_modules = (LlamaAttention, RMSNorm, SwiGLU)  # GPT.set_kernels switches these
    attention_modules = (LlamaAttention,)  # with RoPE: what 'triton_sdpa' leaves on PyTorch

    def __init__(self, config: GPTConfig, kernels_backend: str = "torch"):
        nn.Module.__init__(self)
        if config.arch != "llama":
            raise ConfigError(f"Llama needs config.arch == 'llama', got {config.arch!r}")
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layer)),
                ln_f=RMSNorm(config.n_embd, config.layer_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.set_kernels(kernels_backend)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def hidden_states(self, idx, head_link=None):
        B, T = idx.shape
        self._check_length(T)
        positions = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.token_embeddings(idx, head_link))
        for i, block in enumerate(self.transformer.h):
            x = self.run_block(i, block, x, positions)
        return self.transformer.ln_f(x)

    @torch.no_grad()
    def cached_forward(self, idx, past: int, cache: list, capacity: int):
        """Logits (B, T, V) of `idx` placed after `past` cached positions; `cache` holds per-layer (k, v)
        buffers (B, n_kv, capacity, hs), created on first use (staged_fast.sample.CachedDecoder)."""
        tr = self.transformer
        B, T = idx.shape
        positions = torch.arange(past, past + T, device=idx.device)
        x = tr.wte(idx)
        if past == 0:
            mask, causal = None, True
        elif T == 1:
            mask, causal = None, False
        else:
            keys = torch.arange(past + T, device=idx.device)
            mask, causal = keys[None, :] <= positions[:, None], False
        for i, block in enumerate(tr.h):
            attn = block.attn
            q, k, v = attn.qkv(block.ln_1(x), positions)
            if len(cache) <= i:
                shape = (B, attn.n_kv_head, capacity, attn.head_dim)
                cache.append((k.new_empty(shape), v.new_empty(shape)))
            k_cache, v_cache = cache[i]
            k_cache[:, :, past: past + T] = k
            v_cache[:, :, past: past + T] = v
            kk, vv = k_cache[:, :, : past + T], v_cache[:, :, : past + T]  # n_kv heads, read as they are
            y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, is_causal=causal, enable_gqa=True)
            x = x + attn.c_proj(y.transpose(1, 2).reshape(B, T, attn.n_head * attn.head_dim))
            x = x + block.mlp(block.ln_2(x))
        return self.lm_head(tr.ln_f(x))
