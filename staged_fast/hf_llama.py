"""Weight conversion between our llama family (staged_fast/llama.py) and transformers' LlamaForCausalLM.

Both store nn.Linear (out, in) weights, so the conversion is a renaming; RoPE uses HF's rotate-half layout
on both sides, so q/k need no permutation. Import refuses (LlamaImportError, exit 2 in the CLIs) what our
model cannot compute: biases, another activation, RoPE scaling, a head_dim other than hidden/heads, and weights
that do not match the config (missing or extra ones; hf.load_pretrained checks the folder's files).
"""
from __future__ import annotations

import re

import torch

from .config import GPTConfig
from .hf import HFImportError, check_weights, special_token_id

# ours -> HF, per block; outside the blocks: embedding, final norm, head
_BLOCK = {
    "ln_1.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_TOP = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}
_BLOCK_RE = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_HF_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class LlamaImportError(HFImportError):
    """A LlamaForCausalLM config our llama family cannot honour; the message names the field."""


def is_llama_hf_config(hf_cfg) -> bool:
    return getattr(hf_cfg, "model_type", None) == "llama"


def hf_config(config: GPTConfig, bos_token_id: int | None = 50256, eos_token_id: int | None = 50256):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.n_positions,
        rms_norm_eps=config.layer_norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=config.attn_dropout,
        bos_token_id=special_token_id(bos_token_id, config.vocab_size),
        eos_token_id=special_token_id(eos_token_id, config.vocab_size),
        rope_theta=config.rope_theta,
    )
    _set_rope_theta(cfg, config.rope_theta)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def _set_rope_theta(cfg, theta: float) -> None:
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict):  # transformers >= 5
        params["rope_theta"] = float(theta)
        params.setdefault("rope_type", "default")
    else:
        cfg.rope_theta = float(theta)


def _rope(hf_cfg) -> float:
    params = getattr(hf_cfg, "rope_parameters", None)
    scaling = getattr(hf_cfg, "rope_scaling", None)
    for p in (params, scaling):
        if isinstance(p, dict) and p.get("rope_type", p.get("type", "default")) not in ("default", None):
            raise LlamaImportError(f"RoPE scaling {p} is not supported: staged_fast's llama applies plain RoPE "
                                   f"(rope_type 'default').")
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(hf_cfg, "rope_theta", 10000.0))


def config_from_hf(hf_cfg) -> GPTConfig:
    """Our llama config from a LlamaConfig; LlamaImportError for what we cannot compute."""
    if not is_llama_hf_config(hf_cfg):
        raise LlamaImportError(f"model_type {getattr(hf_cfg, 'model_type', None)!r} is not 'llama'.")
    d, n_head = hf_cfg.hidden_size, hf_cfg.num_attention_heads
    checks = [
        (getattr(hf_cfg, "hidden_act", "silu") == "silu", f"hidden_act={getattr(hf_cfg, 'hidden_act', None)!r} (only silu: SwiGLU)"),
        (not getattr(hf_cfg, "attention_bias", False), "attention_bias=True (our llama has no biases)"),
        (not getattr(hf_cfg, "mlp_bias", False), "mlp_bias=True (our llama has no biases)"),
        (getattr(hf_cfg, "pretraining_tp", 1) in (1, None), f"pretraining_tp={getattr(hf_cfg, 'pretraining_tp', None)}"),
        (d % n_head == 0 and getattr(hf_cfg, "head_dim", None) in (None, d // n_head),
         f"head_dim={getattr(hf_cfg, 'head_dim', None)} with hidden_size={d}, num_attention_heads={n_head} "
         f"(we need head_dim = hidden_size / num_attention_heads)"),
    ]
    bad = [why for ok, why in checks if not ok]
    if bad:
        raise LlamaImportError("this LlamaForCausalLM cannot be represented by staged_fast's llama: " + "; ".join(bad))
    theta = _rope(hf_cfg)
    try:
        return GPTConfig(
            arch="llama", n_layer=hf_cfg.num_hidden_layers, n_embd=d, n_head=n_head,
            n_kv_head=hf_cfg.num_key_value_heads or n_head, intermediate_size=hf_cfg.intermediate_size,
            vocab_size=hf_cfg.vocab_size, n_positions=hf_cfg.max_position_embeddings,
            layer_norm_eps=hf_cfg.rms_norm_eps, rope_theta=theta, dropout=0.0,
            attn_dropout=float(getattr(hf_cfg, "attention_dropout", 0.0) or 0.0),
            tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)),
        )
    except ValueError as e:  # ConfigError
        raise LlamaImportError(f"this LlamaForCausalLM config is not valid for staged_fast's llama: {e}") from e


def to_hf_name(name: str) -> str:
    m = _BLOCK_RE.match(name)
    if m:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}"
    return _TOP[name]


def from_hf_name(name: str) -> str | None:
    m = _HF_BLOCK_RE.match(name)
    if m:
        inverse = {v: k for k, v in _BLOCK.items()}
        return f"transformer.h.{m.group(1)}.{inverse[m.group(2)]}" if m.group(2) in inverse else None
    inverse = {v: k for k, v in _TOP.items()}
    return inverse.get(name)


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        out[to_hf_name(name)] = tensor
    return out


def to_hf(model, *, bos_token_id: int | None = 50256, eos_token_id: int | None = 50256):
    """A LlamaForCausalLM holding a copy of `model`'s weights."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(hf_config(model.config, bos_token_id, eos_token_id))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"HF llama conversion mismatch: missing {missing}, unexpected {unexpected}")
    if model.config.tie_embeddings:
        hf.tie_weights()
    return hf.to(next(model.parameters()).dtype)


def from_hf(hf_model, kernels_backend: str = "torch"):
    """Our llama with a copy of a LlamaForCausalLM's weights."""
    from .model import GPT

    config = config_from_hf(hf_model.config)
    model = GPT(config, kernels_backend=kernels_backend)
    state, unknown = {}, []
    for name, tensor in hf_model.state_dict().items():
        ours = from_hf_name(name)
        if ours is None:
            if not name.endswith("rotary_emb.inv_freq"):
                unknown.append(name)
            continue
        if not (ours == "lm_head.weight" and config.tie_embeddings):
            state[ours] = tensor
    if config.tie_embeddings and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    check_weights(sorted(set(model.state_dict()) - set(state)), unknown, type(hf_model).__name__)
    model.load_state_dict(state, strict=True)
    return model
