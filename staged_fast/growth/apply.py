"""Model- and optimizer-level growth operators: width doubling and depth doubling of a GPT + AdamW.

`grow_model` consumes the old model and optimizer: as soon as a parameter's grown value and grown Adam
state are written, the old parameter and state are dropped (the old model's slot is set to None, the old
optimizer is emptied), so memory peaks at the grown state plus one old parameter's tensors, never at two
full copies. Do not use the old model or optimizer afterwards, and do not keep other references to their
parameters (e.g. a DDP wrapper: drop it before growing and wrap the new model).
"""
from __future__ import annotations

import inspect
import logging

import torch
import torch.nn as nn

from ..config import GPTConfig
from ..model import GPT
from ..heap import release_free_heap
from . import index_maps as im

log = logging.getLogger("staged_fast.growth")

GROWTH_OPS = ("width", "alternate_copy", "append_copy", "alternate_id", "append_id")
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # max_exp_avg_sq: AdamW(amsgrad=True)
MEMORY_SLACK = 0.05  # the bound: grown state + largest old tensor + 5% of the grown state


class GrowthError(ValueError):
    """A growth request that cannot be honoured; the message says why and what would work."""


# ------------------------------------------------------------------------------------------ configs
def grown_config(config: GPTConfig, op: str) -> GPTConfig:
    """The config after one growth op: width doubles n_embd and n_head (head_dim kept), depth n_layer.

    GPT-2's options grow exactly (width keeps head_dim, so the attention scale; activations are elementwise;
    an untied head grows like wte) except scale_attn_by_inverse_layer_idx under depth growth: a layer's scale
    is 1/(index + 1), so only append_id (old layers keep their index, new ones are identities) keeps the
    function, and the other depth ops are refused.
    """
    check_op(op)
    if config.scale_attn_by_inverse_layer_idx and op not in ("width", "append_id"):
        raise GrowthError(
            f"{op!r} cannot grow a model with scale_attn_by_inverse_layer_idx=True: its attention scores are divided "
            f"by layer index + 1, and {op} gives layers new indices (or copies a layer to an index with another "
            f"scale), which changes the function. Use depth op 'append_id' (old layers keep their index) or width.")
    if op == "width":
        if config.arch == "llama":  # kv heads and the SwiGLU hidden double too (head_dim kept)
            return config.replace(n_embd=2 * config.n_embd, n_head=2 * config.n_head, n_kv_head=2 * config.n_kv_head,
                                  intermediate_size=2 * config.intermediate_size)
        return config.replace(n_embd=2 * config.n_embd, n_head=2 * config.n_head)
    return config.replace(n_layer=2 * config.n_layer)


def check_op(op: str) -> None:
    if op not in GROWTH_OPS:
        raise GrowthError(f"unknown growth op {op!r}; valid ops: {', '.join(GROWTH_OPS)}")


def check_target(config: GPTConfig, op: str, target: GPTConfig | None) -> GPTConfig:
    """The grown config; raises GrowthError if `target` is given and is not what `op` produces."""
    new = grown_config(config, op)
    if target is not None and not new.same_shape(target):
        raise GrowthError(
            f"growing {config.shape_str()} with {op!r} gives {new.shape_str()}, not the requested "
            f"{target.shape_str()}: every growth op doubles exactly one dimension (width: n_embd and n_head; "
            f"depth: n_layer) and keeps vocab_size/n_positions. Valid steps from here: "
            f"{grown_config(config, 'width').shape_str()} (width) or {grown_config(config, 'append_id').shape_str()} (depth)."
        )
    return new


def growth_plan(src: GPTConfig, dst: GPTConfig, depth_mode: str = "alternate_id") -> list[str]:
    """The ops that grow `src` into `dst` (depth first, then width), e.g. ['width', 'width'].

    Raises GrowthError when `dst` is not reached by doublings (non-power-of-two ratio, head_dim change,
    other vocab or context length).
    """
    check_op(depth_mode)
    if depth_mode == "width":
        raise GrowthError("depth_mode must be a depth op: " + ", ".join(GROWTH_OPS[1:]))

    def doublings(a: int, b: int, what: str) -> int:
        k = 0
        while a < b:
            a, k = 2 * a, k + 1
        if a != b:
            raise GrowthError(
                f"cannot grow {src.shape_str()} into {dst.shape_str()}: {what} {b} is not the source's "
                f"{what} times a power of two; growth only doubles."
            )
        return k

    if (src.vocab_size, src.n_positions) != (dst.vocab_size, dst.n_positions) or src.head_dim != dst.head_dim:
        raise GrowthError(
            f"cannot grow {src.shape_str()} into {dst.shape_str()}: vocab_size, n_positions and head_dim "
            f"({src.head_dim} vs {dst.head_dim}) must match; width growth doubles heads at fixed head_dim."
        )
    if src.arch != dst.arch:
        raise GrowthError(f"cannot grow {src.shape_str()} ({src.arch}) into {dst.shape_str()} ({dst.arch}): growth "
                          f"keeps the architecture.")
    depth = doublings(src.n_layer, dst.n_layer, "n_layer")
    width = doublings(src.n_embd, dst.n_embd, "n_embd")
    ops = [depth_mode] * depth + ["width"] * width
    reached = src
    for op in ops:
        reached = grown_config(reached, op)
    if not reached.same_shape(dst):  # llama: width also doubles n_kv_head and intermediate_size
        raise GrowthError(f"cannot grow {src.shape_str()} into {dst.shape_str()}: doubling gives "
                          f"{reached.shape_str()} (width growth doubles every width dimension together).")
    return ops


# ------------------------------------------------------------------------------ model plumbing
def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, leaf = name.rsplit(".", 1)
    return model.get_submodule(path), leaf


def _set_param(model: nn.Module, name: str, value) -> None:
    module, leaf = _owner(model, name)
    module._parameters[leaf] = value


def _tie(model: GPT) -> None:
    if model.config.tie_embeddings:  # GPT-2 always; llama unless --tie_embeddings is off
        model.lm_head.weight = model.transformer.wte.weight


def _meta_gpt(config: GPTConfig, kernels_backend: str) -> GPT:
    """A GPT skeleton whose parameters live on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return GPT(config, kernels_backend=kernels_backend)


def _optimizer_layout(model: GPT, optimizer):
    """(groups [(hyperparameters, [names])], {name: state}) with checks, without changing anything."""
    named = dict(model.named_parameters())
    if optimizer is None:
        return None, {}
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise GrowthError(f"growth maps Adam/AdamW state; got {type(optimizer).__name__}")
    by_id = {id(p): n for n, p in named.items()}
    groups, seen = [], set()
    for g in optimizer.param_groups:
        names = []
        for p in g["params"]:
            if id(p) not in by_id:
                raise GrowthError(
                    f"optimizer parameter mismatch: the optimizer holds a {tuple(p.shape)} tensor that is not a "
                    f"parameter of the model (was it built over another model, or a DDP/compiled wrapper's copy?)"
                )
            names.append(by_id[id(p)])
        seen.update(names)
        groups.append(({k: v for k, v in g.items() if k != "params"}, names))
    if seen != set(named):
        raise GrowthError(f"optimizer parameter mismatch: model parameters missing from the optimizer: "
                          f"{sorted(set(named) - seen)}")
    state = {}
    for p, s in optimizer.state.items():
        name = by_id[id(p)]
        for k in STATE_KEYS:
            if k in s and tuple(s[k].shape) != tuple(p.shape):
                raise GrowthError(f"optimizer parameter mismatch: state {k} of {name} has shape "
                                  f"{tuple(s[k].shape)}, the parameter {tuple(p.shape)}")
        state[name] = s
    return groups, state


def _new_optimizer(optimizer, groups, params: dict[str, nn.Parameter], state: dict[str, dict]):
    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    new = cls([dict(hyper, params=[params[n] for n in names]) for hyper, names in groups], **defaults)
    for name, s in state.items():
        new.state[params[name]] = s
    return new


def _step_value(old_step, optimizer_step: int | None):
    if optimizer_step is None:
        return old_step.clone() if torch.is_tensor(old_step) else old_step
    if torch.is_tensor(old_step):
        return torch.tensor(float(optimizer_step), dtype=old_step.dtype, device=old_step.device)
    return optimizer_step


# ------------------------------------------------------------------------------------- operators
def grow_model(
    model: GPT,
    optimizer: torch.optim.AdamW | None,
    op: str,
    *,
    width_noise: float = 0.0,
    generator: torch.Generator | None = None,
    optimizer_step: int | None = None,
    target: GPTConfig | None = None,
    backend: str = "auto",
) -> tuple[GPT, torch.optim.AdamW | None]:
    """Grow `model` (and its AdamW state) by `op`, one of GROWTH_OPS; returns (new_model, new_optimizer).

    The new GPT has the grown config on the same device and dtype, the same kernels backend and
    train/eval mode; the new optimizer (same class, param groups and hyperparameters) holds the grown
    state. `optimizer_step` overrides every parameter's Adam step (--restart_steps). `width_noise` > 0
    splits every block row into [W - E, E], E ~ N(0, width_noise^2) drawn from `generator` (default: a
    CPU generator seeded 0, so every DDP rank grows identically). Gradients are discarded. The old model
    and optimizer are consumed (module docstring). `target`: the expected grown config (checked).
    `backend`: 'auto' (fused kernels if built), 'fused' or 'reference' (see staged_fast.growth.fused).
    """
    new_config, groups, state, backend = _consume(model, optimizer, op, width_noise, target, backend)
    new = _meta_gpt(new_config, model.kernels_backend)
    if op == "width":
        params, new_state = _grow_width(model, state, width_noise, generator, backend)
        renamed = {name: [name] for name in params}
    else:
        params, new_state, renamed = _grow_depth(model, state, op, backend)
    return new, _finish(new, model, optimizer, groups, renamed, params, new_state, optimizer_step)


def _consume(model: GPT, optimizer, op: str, width_noise: float, target: GPTConfig | None, backend: str):
    """Check a growth request, then consume the old model and optimizer (gradients dropped, optimizer emptied):
    (grown config, param groups, {name: state}, resolved backend). Shared with staged_fast.sharded."""
    from . import fused as ops

    new_config = check_target(model.config, op, target)
    if width_noise < 0:
        raise GrowthError(f"width_noise must be >= 0, got {width_noise}")
    if width_noise and op != "width":
        raise GrowthError(f"width_noise applies to width growth only, not {op!r}")
    groups, state = _optimizer_layout(model, optimizer)
    release_free_heap()  # start from a trimmed heap: the bound counts resident memory
    first = next(model.parameters())
    backend = ops.resolve_backend(backend, first.device)
    # Validation is done: from here on the old model and optimizer are consumed.
    for p in model.parameters():
        p.grad = None
    if optimizer is not None:
        optimizer.state.clear()
        for g in optimizer.param_groups:
            g["params"] = []
    return new_config, groups, state, backend


def _finish(new: GPT, model: GPT, optimizer, groups, renamed, params, new_state, optimizer_step):
    """Put the grown `params` into `new` (head tied, the old model's train mode) and return the new optimizer
    over them (None without one) holding `new_state`, its steps set. Shared with staged_fast.sharded."""
    if groups is not None:  # each old parameter's group now holds its grown parameter(s), in the model's order
        rank = {name: i for i, (name, _) in enumerate(new.named_parameters())}  # (a checkpoint resumes by it)
        groups = [(hyper, sorted((n for old in names for n in renamed[old]), key=rank.__getitem__))
                  for hyper, names in groups]
    for name, p in params.items():
        _set_param(new, name, p)
    _tie(new)
    new.train(model.training)
    for s in new_state.values():
        if "step" in s:
            s["step"] = _step_value(s["step"], optimizer_step)
    return None if optimizer is None else _new_optimizer(optimizer, groups, params, new_state)


def _state_tensors(s: dict) -> list[str]:
    return [k for k in STATE_KEYS if k in s]


def _scales(rule: im.Rule, keys: list[str]) -> list[float]:
    """The scales of a parameter's value and of its state tensors `keys` under `rule`."""
    return [rule.param_scale] + [rule.exp_avg_scale if k == "exp_avg" else rule.exp_avg_sq_scale for k in keys]


def _draw_noise(rule: im.Rule, width_noise: float, generator, device) -> torch.Tensor | None:
    """The [W - E, E] split's E of one parameter (None if it takes none), drawn whole from `generator`."""
    if not (width_noise and rule.noise):
        return None
    noise = torch.empty(rule.tiling.noise_shape(), dtype=torch.float32, device=generator.device)
    noise.normal_(0.0, width_noise, generator=generator)
    return noise.to(device)


def _grow_width(model: GPT, state: dict, width_noise: float, generator, backend: str):
    from . import fused as ops

    E = model.config.n_embd
    named = dict(model.named_parameters())
    rules = {n: im.width_rule(n, tuple(p.shape), E) for n, p in named.items()}
    # The memory bound decides whether a parameter's tensors grow in one fused pass (all its old
    # tensors live until the pass ends) or one tensor at a time (each old tensor freed right away).
    def nbytes(n, factor):
        k = 1 + len(_state_tensors(state.get(n, {})))
        return k * named[n].numel() * named[n].element_size() * factor

    grown_total = sum(nbytes(n, rules[n].tiling.row_halves * rules[n].tiling.col_halves) for n in named)
    largest_old = max(named[n].numel() * named[n].element_size() for n in named)
    allowance = largest_old + MEMORY_SLACK * grown_total
    if width_noise and generator is None:
        generator = torch.Generator().manual_seed(0)
    params, new_state = {}, {}
    for name in list(named):
        rule = rules[name]
        old = named.pop(name)
        requires_grad = old.requires_grad
        device = old.device
        _set_param(model, name, None)
        if name == "transformer.wte.weight":
            model.lm_head._parameters["weight"] = None
        s = state.pop(name, {})
        keys = _state_tensors(s)
        sources = [old.detach()] + [s.pop(k) for k in keys]
        del old
        scales = _scales(rule, keys)
        noise = _draw_noise(rule, width_noise, generator, device)
        old_bytes = sum(t.numel() * t.element_size() for t in sources)
        noise_bytes = 0 if noise is None else noise.numel() * 4
        outs = []
        if backend == "reference":  # the seed's way: each grown tensor built by torch.cat
            while sources:
                src = sources.pop(0)
                outs.append(ops.grow_tensor(src, rule.tiling, scales[len(outs)], noise if not outs else None,
                                            backend="reference"))
                del src
        elif old_bytes + noise_bytes <= allowance:  # one fused pass writes param, exp_avg, exp_avg_sq
            outs = [torch.empty(rule.dst_shape, dtype=t.dtype, device=t.device) for t in sources]
            ops.grow_tiles_(sources, outs, scales, rule.tiling, noise, backend="fused")
            sources.clear()
        else:  # one tensor at a time, so only one old tensor is ever alive beside the grown state
            while sources:
                src = sources.pop(0)
                out = torch.empty(rule.dst_shape, dtype=src.dtype, device=src.device)
                ops.grow_tiles_([src], [out], [scales[len(outs)]], rule.tiling, noise if not outs else None,
                                backend="fused")
                outs.append(out)
                del src
        del noise
        release_free_heap()  # the old tensors just freed go back to the OS before the next allocation
        params[name] = nn.Parameter(outs[0].view(rule.dst_shape), requires_grad=requires_grad)
        if s or keys:
            s.update({k: t.view(rule.dst_shape) for k, t in zip(keys, outs[1:])})
            new_state[name] = s
    return params, new_state


def _grow_depth(model: GPT, state: dict, op: str, backend: str):
    named = dict(model.named_parameters())
    params, new_state, renamed = {}, {}, {}
    for new_name, old_name, scale in _depth_moves(list(named), model.config.n_layer, op):
        renamed.setdefault(old_name, []).append(new_name)
        old, s = named[old_name], state.get(old_name, {})
        if scale is None:  # an original layer (or a parameter outside the blocks) moves without a copy
            params[new_name] = old
            if s:
                new_state[new_name] = s
            continue
        keys = _state_tensors(s)
        outs = _copy_tensors([old.detach()] + [s[k] for k in keys], scale, backend)
        params[new_name] = nn.Parameter(outs[0], requires_grad=old.requires_grad)
        if s:
            new_state[new_name] = _inserted_state(s, keys, outs[1:])
    for name in named:
        _set_param(model, name, None)
    model.lm_head._parameters["weight"] = None
    return params, new_state, renamed


def _depth_moves(names: list[str], n_layer: int, op: str) -> list[tuple[str, str, float | None]]:
    """(new name, old name, scale) of every parameter after depth op `op`: the inserted layers' first (they
    read the old tensors; scale 1: a copy, 0: zeros), then the originals and the parameters outside the
    blocks (scale None: the old tensor itself, moved without a copy). Shared with staged_fast.sharded."""
    block_params = {}  # old layer index -> {suffix: name}
    for name in names:
        if name.startswith("transformer.h."):
            i, suffix = name[len("transformer.h."):].split(".", 1)
            block_params.setdefault(int(i), {})[suffix] = name
    identity = op.endswith("_id")
    moves = []
    for new_i, old_i, inserted in sorted(im.depth_layer_map(n_layer, op), key=lambda m: not m[2]):
        for suffix, old_name in block_params[old_i].items():
            scale = im.depth_scale(suffix, True, identity) if inserted else None
            moves.append((f"transformer.h.{new_i}.{suffix}", old_name, scale))
    return moves + [(name, name, None) for name in names if not name.startswith("transformer.h.")]


def _copy_tensors(sources: list[torch.Tensor], scale: float, backend: str) -> list[torch.Tensor]:
    """`scale * t` (scale 1: a copy, 0: +0.0 zeros) of each tensor: an inserted layer's value and state."""
    from . import fused as ops

    if backend == "reference":  # the seed's way: clone (deepcopy) or zeros_like
        return [src.clone() if scale else torch.zeros_like(src) for src in sources]
    outs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in sources]
    if sources[0].numel():  # (an empty FSDP shard has nothing to write)
        rule = im.copy_rule(tuple(sources[0].shape), scale)
        ops.grow_tiles_(sources, outs, [scale] * len(sources), rule.tiling, backend="fused")
    return outs


def _inserted_state(s: dict, keys: list[str], tensors: list[torch.Tensor]) -> dict:
    """An inserted layer's optimizer state: its source's (step and other entries cloned) with `tensors` as `keys`."""
    extra = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items() if k not in STATE_KEYS}
    return dict(extra, **dict(zip(keys, tensors)))
