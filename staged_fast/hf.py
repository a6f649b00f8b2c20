"""Weight conversion between our GPT and transformers' GPT2LMHeadModel.

HF's Conv1D keeps weights as (in, out); our nn.Linear as (out, in): the four projection matrices of
each block are transposed on the way, everything else maps by name.
"""
from __future__ import annotations

import torch

from .config import GPTConfig
from .model import GPT

_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_config(config: GPTConfig):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=4 * config.n_embd,
        activation_function="gelu_new",  # tanh-GELU
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.attn_dropout,
        layer_norm_epsilon=config.layer_norm_eps,
        tie_word_embeddings=True,
        bos_token_id=50256,
        eos_token_id=50256,
    )


def config_from_hf(hf_cfg) -> GPTConfig:
    if getattr(hf_cfg, "n_inner", None) not in (None, 4 * hf_cfg.n_embd):
        raise ValueError(f"n_inner={hf_cfg.n_inner} is not 4*n_embd; staged_fast models use a 4d FFN.")
    return GPTConfig(
        n_layer=hf_cfg.n_layer,
        n_embd=hf_cfg.n_embd,
        n_head=hf_cfg.n_head,
        vocab_size=hf_cfg.vocab_size,
        n_positions=hf_cfg.n_positions,
        dropout=hf_cfg.resid_pdrop,
        attn_dropout=hf_cfg.attn_pdrop,
        layer_norm_eps=hf_cfg.layer_norm_epsilon,
    )


def _is_conv1d(name: str) -> bool:
    return name.endswith(_CONV1D_SUFFIXES)


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        out[name] = tensor.t().contiguous() if _is_conv1d(name) else tensor
    return out


def to_hf(model: GPT):
    """A GPT2LMHeadModel (a LlamaForCausalLM for --arch llama) holding a copy of `model`'s weights."""
    from transformers import GPT2LMHeadModel

    if model.config.arch == "llama":
        from . import hf_llama

        return hf_llama.to_hf(model)

    hf = GPT2LMHeadModel(hf_config(model.config))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"HF conversion mismatch: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.to(next(model.parameters()).dtype)


def from_hf(hf_model, kernels_backend: str = "torch") -> GPT:
    """Our GPT with a copy of a GPT2LMHeadModel's weights (our llama from a LlamaForCausalLM's)."""
    from . import hf_llama

    if hf_llama.is_llama_hf_config(hf_model.config):
        return hf_llama.from_hf(hf_model, kernels_backend)
    config = config_from_hf(hf_model.config)
    model = GPT(config, kernels_backend=kernels_backend)
    state = {}
    for name, tensor in hf_model.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # causal-mask buffers of old HF versions; the tied head
        state[name] = tensor.t().contiguous() if _is_conv1d(name) else tensor
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=True)
    return model


def save_pretrained(model: GPT, out_dir, tokenizer=None) -> None:
    """Write a folder that `AutoModelForCausalLM.from_pretrained` loads (safetensors weights)."""
    hf = to_hf(model)
    hf.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def load_pretrained(path_or_name, kernels_backend: str = "torch") -> GPT:
    from transformers import AutoConfig, GPT2LMHeadModel

    from . import hf_llama

    hf_cfg = AutoConfig.from_pretrained(path_or_name)
    if hf_llama.is_llama_hf_config(hf_cfg):  # checked before the weights are read
        from transformers import LlamaForCausalLM

        hf_llama.config_from_hf(hf_cfg)
        return hf_llama.from_hf(LlamaForCausalLM.from_pretrained(path_or_name), kernels_backend)

    return from_hf(GPT2LMHeadModel.from_pretrained(path_or_name), kernels_backend)
