"""Weight conversion between our GPT and transformers' GPT2LMHeadModel (LlamaForCausalLM: hf_llama.py).

HF's Conv1D keeps weights as (in, out); our nn.Linear as (out, in): the four projection matrices of
each block are transposed on the way, everything else maps by name.

Import is exact or refused. A GPT2Config's activation_function (ACTIVATIONS in model.py), scale_attn_weights,
scale_attn_by_inverse_layer_idx and tie_word_embeddings (an untied lm_head) are honoured and exported back;
reorder_and_upcast_attn is accepted (it changes only the rounding of half-precision attention scores: our
kernels keep the softmax in fp32). Refused with HFImportError (a ConfigError: exit 2 in the CLIs): another
model_type, cross-attention, an FFN other than 4 * n_embd, an activation we do not compute, and a folder whose
weights do not match its config (missing ones, which transformers would initialise at random, or extra ones).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError, GPTConfig
from .model import ACTIVATIONS, GPT

_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old HF versions
MODEL_TYPES = ("gpt2", "llama")


class HFImportError(ConfigError):
    """A Hugging Face model staged_fast cannot represent exactly; the message names the problem and the fix."""


def special_token_id(token_id: int | None, vocab_size: int) -> int | None:
    return token_id if token_id is not None and token_id < vocab_size else None


# our GPTConfig field -> GPT2Config field; the two directions of the conversion read this one table
_FIELDS = {
    "vocab_size": "vocab_size", "n_positions": "n_positions", "n_embd": "n_embd", "n_layer": "n_layer",
    "n_head": "n_head", "dropout": "resid_pdrop", "attn_dropout": "attn_pdrop", "layer_norm_eps": "layer_norm_epsilon",
    "tie_embeddings": "tie_word_embeddings", "activation_function": "activation_function",
    "scale_attn_weights": "scale_attn_weights", "scale_attn_by_inverse_layer_idx": "scale_attn_by_inverse_layer_idx",
}


def hf_config(config: GPTConfig, bos_token_id: int | None = 50256, eos_token_id: int | None = 50256):
    from transformers import GPT2Config

    return GPT2Config(
        **{theirs: getattr(config, ours) for ours, theirs in _FIELDS.items()},
        n_inner=4 * config.n_embd,
        embd_pdrop=config.dropout,
        bos_token_id=special_token_id(bos_token_id, config.vocab_size),
        eos_token_id=special_token_id(eos_token_id, config.vocab_size),
    )


def config_from_hf(hf_cfg) -> GPTConfig:
    """Our config from a GPT2Config (a LlamaConfig goes to hf_llama); HFImportError for what we cannot compute."""
    from . import hf_llama

    model_type = getattr(hf_cfg, "model_type", None)
    if model_type == "llama":
        return hf_llama.config_from_hf(hf_cfg)
    if model_type != "gpt2":
        raise HFImportError(_unsupported_type(model_type))
    d = hf_cfg.n_embd
    act = hf_cfg.activation_function
    checks = [
        (not getattr(hf_cfg, "add_cross_attention", False), "add_cross_attention=True (a decoder of an encoder-"
                                                             "decoder pair; ours has self-attention only)"),
        (getattr(hf_cfg, "n_inner", None) in (None, 4 * d), f"n_inner={getattr(hf_cfg, 'n_inner', None)} (our MLP "
                                                             f"is 4 * n_embd = {4 * d})"),
        (act in ACTIVATIONS, f"activation_function={act!r} (supported: {', '.join(ACTIVATIONS)})"),
    ]
    bad = [why for ok, why in checks if not ok]
    if bad:
        raise HFImportError(f"this GPT-2 cannot be represented exactly by staged_fast's GPT: {'; '.join(bad)}. "
                            f"Fix: convert it to a supported configuration first, or train from scratch (--random).")
    try:
        return GPTConfig(**{ours: getattr(hf_cfg, theirs) for ours, theirs in _FIELDS.items()})
    except ConfigError as e:
        raise HFImportError(f"this GPT-2 config is not valid for staged_fast's GPT: {e}") from e


def _unsupported_type(model_type) -> str:
    return (f"model_type {model_type!r} is not supported: staged_fast imports GPT-2 (GPT2LMHeadModel, model_type "
            f"'gpt2') and Llama (LlamaForCausalLM, 'llama') models only. Fix: give a folder of one of those, or "
            f"train from scratch (--random).")


def _is_conv1d(name: str) -> bool:
    return name.endswith(_CONV1D_SUFFIXES)


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue  # tied to transformer.wte.weight
        out[name] = tensor.t().contiguous() if _is_conv1d(name) else tensor
    return out


def to_hf(model: GPT, *, bos_token_id: int | None = 50256, eos_token_id: int | None = 50256):
    """A GPT2LMHeadModel (a LlamaForCausalLM for --arch llama) holding a copy of `model`'s weights; the special
    token ids (GPT-2 BPE's by default) go into its config and generation config."""
    from transformers import GPT2LMHeadModel

    if model.config.arch == "llama":
        from . import hf_llama

        return hf_llama.to_hf(model, bos_token_id=bos_token_id, eos_token_id=eos_token_id)

    hf = GPT2LMHeadModel(hf_config(model.config, bos_token_id, eos_token_id))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    tied = model.config.tie_embeddings
    missing = [k for k in missing if not (k.endswith(_HF_BUFFERS) or (k == "lm_head.weight" and tied))]
    if missing or unexpected:
        raise RuntimeError(f"HF conversion mismatch: missing {missing}, unexpected {unexpected}")
    if tied:
        hf.tie_weights()
    return hf.to(next(model.parameters()).dtype)


def from_hf(hf_model, kernels_backend: str = "torch") -> GPT:
    """Our GPT with a copy of a GPT2LMHeadModel's weights (our llama from a LlamaForCausalLM's)."""
    from . import hf_llama

    config = config_from_hf(hf_model.config)
    if config.arch == "llama":
        return hf_llama.from_hf(hf_model, kernels_backend)
    model = GPT(config, kernels_backend=kernels_backend)
    state = {}
    for name, tensor in hf_model.state_dict().items():
        if name.endswith(_HF_BUFFERS) or (name == "lm_head.weight" and config.tie_embeddings):
            continue  # the tied head is wte
        state[name] = tensor.t().contiguous() if _is_conv1d(name) else tensor
    if config.tie_embeddings and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    check_weights(sorted(set(model.state_dict()) - set(state)), sorted(set(state) - set(model.state_dict())),
                  type(hf_model).__name__)
    model.load_state_dict(state, strict=True)
    return model


def check_weights(missing, unexpected, what: str) -> None:
    """HFImportError naming up to five missing and five unexpected weights (nothing is initialised at random)."""
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} weight(s) missing ({', '.join(sorted(missing)[:5])}"
                     f"{', ...' if len(missing) > 5 else ''}), which would start from random values")
    if unexpected:
        parts.append(f"{len(unexpected)} weight(s) the model has no place for ({', '.join(sorted(unexpected)[:5])}"
                     f"{', ...' if len(unexpected) > 5 else ''})")
    raise HFImportError(f"{what}: the weights do not match the model its config describes: {'; '.join(parts)}. "
                        f"staged_fast imports complete models only. Fix: point at the folder the model was saved to "
                        f"with save_pretrained (all weight files, and the config.json written with them), or train "
                        f"from scratch (--random).")


def save_pretrained(model: GPT, out_dir, tokenizer=None, *, bos_token_id: int | None = 50256,
                    eos_token_id: int | None = 50256) -> None:
    """Write a folder that `AutoModelForCausalLM.from_pretrained` loads (safetensors weights)."""
    hf = to_hf(model, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    hf.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def _local_model_type(path_or_name):
    """model_type from a local folder's config.json (None when there is none to read)."""
    try:
        data = json.loads((Path(path_or_name).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data.get("model_type", "") if isinstance(data, dict) else None


def pretrained_config(path_or_name) -> GPTConfig:
    """Our config for a HF folder or hub name, from its config.json alone (no weights read); HFImportError for
    what we cannot compute exactly. The trainer calls it before preparing data, so a refusal costs nothing."""
    from transformers import AutoConfig

    local_type = _local_model_type(path_or_name)
    if local_type is not None and local_type not in MODEL_TYPES:  # before transformers, which may not know it
        raise HFImportError(f"{path_or_name}: {_unsupported_type(local_type or None)}")
    hf_cfg = AutoConfig.from_pretrained(path_or_name)
    try:
        return config_from_hf(hf_cfg)
    except HFImportError as e:
        raise HFImportError(f"{path_or_name}: {e}") from e


def load_pretrained(path_or_name, kernels_backend: str = "torch") -> GPT:
    """Our model from a HF folder or hub name, dispatched by model_type (gpt2 / llama). The config is checked
    before any weights are read; the weights must match it exactly (HFImportError otherwise)."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    config = pretrained_config(path_or_name)
    cls = LlamaForCausalLM if config.arch == "llama" else GPT2LMHeadModel
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report ("newly initialized") is replaced by our refusal
    try:
        hf, info = cls.from_pretrained(path_or_name, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    check_weights(info["missing_keys"], info["unexpected_keys"], f"{path_or_name} ({cls.__name__})")
    if info.get("mismatched_keys") or info.get("error_msgs"):
        raise HFImportError(f"{path_or_name}: its weights could not be loaded as they are "
                            f"({list(info.get('mismatched_keys') or info['error_msgs'])[:3]}). Fix: re-save the "
                            f"model with save_pretrained together with its config.json.")
    return from_hf(hf, kernels_backend)
