"""FSDP2 (`--parallel fsdp`): sharding the model, sharded checkpoints, resharding, consolidation, growth.

Sharding: `fully_shard` on every transformer block, then on the root (embeddings, final norm and the tied
head); parameters become DTensors sharded along dim 0 over all ranks, in place (the module object stays the
trainer's `model`). Under --bf16 the policy computes in bf16 and reduces gradients in fp32.

Sharded checkpoint (meta.json `"layout": "dcp"`): a folder `step_<8-digit update>/` holding
  dcp/            torch.distributed.checkpoint files: `__<rank>_<i>.distcp` written by each rank (its own
                  shards of the weights and of the AdamW state; no rank gathers the model) and `.metadata`
  trainer.pt      as in a full checkpoint (rank 0; RNG states of all ranks)
  meta.json       format version, config, layout, world size, and the size and sha256 of every file
It is as atomic as a full checkpoint: all ranks write into one temporary folder and fsync their files, each
hashes its own files, rank 0 gathers the hashes, writes trainer.pt and meta.json last, and renames the folder
into place after all ranks are done (one rename). Loading verifies every listed file, and refuses shard files
that meta.json does not list.

Resharding: DCP stores global shapes and offsets, so a checkpoint written by N ranks loads on M ranks:
  * fsdp run, sharded checkpoint: each rank reads the pieces of its own shards (`load_sharded`);
  * fsdp run, full checkpoint (DDP / single process): each rank keeps its slice of the full state (`load_full`);
  * non-sharded run (DDP, single process, export/evaluate/sample): `consolidate` rebuilds the full state in
    one process, with no process group, in the layout of a full checkpoint.

Growth under fsdp happens inside the shards (`grow_sharded`, what the trainer runs): each rank builds only its
own rows of every grown parameter and of its AdamW state, with the fused op's destination row range, from the
old tensors it needs, one at a time; no rank holds the full grown model. Per-rank peak: its grown shard plus
one full old parameter and its state (docs/growth.md). The result, consolidated, is the single-process
`grow_model` bit for bit. `grow_gather_reshard` (every rank gathers the full model and state, grows it with
`grow_model` and shards the result: full old + full grown per rank) stays as the reference of the tests and
the baseline of benchmarks/bench_distributed.py.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from .optim import names_in_optimizer_order, state_in_layout

LAYOUT = "dcp"
DCP_DIR = "dcp"


# ---------------------------------------------------------------- sharding
def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks (`transformer.h` of GPT and Llama)."""
    return model.transformer.h


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: nn.Module, *, bf16: bool = False) -> nn.Module:
    """FSDP2 in place: each block, then the root. Returns the same module."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in blocks_of(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def local_value(t):
    """A DTensor's full value (a collective), a plain tensor as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------- optimizer state layouts
def indexed_to_fqn(osd: dict, names: list[str]) -> dict:
    """torch's optimizer.state_dict() (integer ids) -> keyed by parameter name (DCP's layout)."""
    return {
        "state": {names[i]: dict(v) for i, v in osd["state"].items()},
        "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in osd["param_groups"]],
    }


def fqn_to_indexed(osd: dict) -> tuple[dict, list[str]]:
    """DCP's name-keyed optimizer state -> (optimizer.state_dict() layout, parameter names in id order)."""
    names = [n for g in osd["param_groups"] for n in g["params"]]
    idx = {n: i for i, n in enumerate(names)}
    state = {idx[n]: dict(v) for n, v in osd["state"].items()}
    groups = [dict(g, params=[idx[n] for n in g["params"]]) for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}, names


# ---------------------------------------------------------------- loading
def saved_group_count(path: str | os.PathLike) -> int:
    """How many optimizer param groups a sharded checkpoint holds (DCP keys them optim.param_groups.<i>.*)."""
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(Path(path) / DCP_DIR)).read_metadata().state_dict_metadata
    return len({m.group(1) for k in keys if (m := re.match(r"optim\.param_groups\.(\d+)\.", k))})


def load_sharded(path: str | os.PathLike, model: nn.Module, optimizer=None) -> int:
    """Each rank reads its own shards (any number of ranks wrote them) into the sharded model/optimizer; returns
    the number of optimizer groups the checkpoint held. DCP keys the state by parameter name but the groups by
    position: a checkpoint written with one group (before staged_fast.optim's two) is read into a one-group
    optimizer, whose state then moves by parameter."""
    saved_groups = saved_group_count(path)
    if optimizer is not None and len(optimizer.param_groups) > 1 and saved_groups == 1:
        settings = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        one = type(optimizer)([dict(settings, params=list(model.parameters()))])
        _load_sharded(path, model, one)
        for p, state in one.state.items():
            optimizer.state[p] = state
        saved = {k: v for k, v in one.param_groups[0].items() if k not in ("params", "weight_decay")}
        for group in optimizer.param_groups:
            group.update(saved)
        return saved_groups
    _load_sharded(path, model, optimizer)
    return saved_groups


def _load_sharded(path, model: nn.Module, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": msd}
    if optimizer is not None:
        state["optim"] = osd
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(Path(path) / DCP_DIR)))
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)
    else:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, msd)


def load_full(model: nn.Module, optimizer, model_state: dict, optimizer_state: dict | None,
              param_names: list[str] | None) -> None:
    """A full (consolidated) state into a sharded model/optimizer: each rank keeps its own slice."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    if model_state is not None:
        set_model_state_dict(model, model_state, options=opts)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, indexed_to_fqn(optimizer_state, param_names), options=opts)


def gather_full(model: nn.Module, optimizer) -> tuple[dict, dict, list[str]]:
    """The full model state and AdamW state (optimizer.state_dict() layout, names) on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    indexed, names = fqn_to_indexed(osd)
    return msd, indexed, names


def consolidate(path: str | os.PathLike, *, load_optimizer: bool = True):
    """(model_state, optimizer_state, param_names) of a sharded checkpoint, full, in this process alone
    (no process group needed; other ranks are not involved). optimizer_state is None without the optimizer."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict = {}
    keys = {"model", "optim"} if load_optimizer else {"model"}
    _load_state_dict(sd, storage_reader=FileSystemReader(str(Path(path) / DCP_DIR)),
                     planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    model_state = dict(sd["model"])
    optimizer_state, names = None, None
    if load_optimizer and "optim" in sd:
        optimizer_state, names = fqn_to_indexed(sd["optim"])
    return model_state, optimizer_state, names


# ---------------------------------------------------------------- saving
def save_sharded(save_dir: str | os.PathLike, *, step: int, model: nn.Module, optimizer, config, trainer_state: dict,
                 info, keep_last: int | None = None, _before_commit=None) -> Path | None:
    """Write `<save_dir>/step_<step>` as a sharded checkpoint (a collective: every rank calls it). Returns the
    path on rank 0 (None elsewhere); raises CheckpointError on every rank if any rank failed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from . import distributed as D
    from .checkpoint import (
        _TMP_PREFIX, FORMAT_VERSION, CheckpointError, _disk_full_error, _free_bytes, _fsync_dir, _fsync_file,
        _is_no_space, _sha256, _tensor_bytes, commit,
    )

    save_dir = Path(save_dir)
    final = save_dir / f"step_{step:08d}"
    tmp = save_dir / D.broadcast_object(f"{_TMP_PREFIX}step_{step:08d}-{os.getpid()}", info)
    error = None
    if info.is_main:
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / DCP_DIR).mkdir(parents=True)
        except OSError as e:
            error = f"cannot create {tmp}: {e}"
    error = D.broadcast_object(error, info)  # also: the folder exists before anyone writes
    if error is not None:
        raise CheckpointError(error)

    msd, osd = get_state_dict(model, optimizer)
    # Space: every rank's shards plus trainer.pt land in one folder (a shared filesystem on several nodes), so
    # rank 0 checks the sum against its free bytes before anyone writes.
    needed = sum(D.gather_objects(_tensor_bytes(msd) + _tensor_bytes(osd), info)) + _tensor_bytes(trainer_state)
    needed += 1 << 20
    if info.is_main:
        free = _free_bytes(save_dir)
        if free is not None and free < needed:
            shutil.rmtree(tmp, ignore_errors=True)
            error = str(_disk_full_error(save_dir, final.name, needed, free, None))
    error = D.broadcast_object(error, info)
    if error is not None:
        raise CheckpointError(error)

    mine, local_error = {}, None
    try:
        dcp.save({"model": msd, "optim": osd}, storage_writer=dcp.FileSystemWriter(str(tmp / DCP_DIR)))
        own = sorted((tmp / DCP_DIR).glob(f"__{info.rank}_*.distcp"))
        if info.is_main:
            own.append(tmp / DCP_DIR / ".metadata")
        for f in own:
            _fsync_file(f)
            mine[f"{DCP_DIR}/{f.name}"] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    except Exception as e:  # noqa: BLE001 - every rank must hear of it
        local_error = f"rank {info.rank}: {type(e).__name__}: {str(e).strip()[:300]}"
        if _is_no_space(e):
            local_error = f"disk full on rank {info.rank} ({e})"
    gathered = D.gather_objects((mine, local_error), info)
    errors = [err for _, err in gathered if err]
    path = None
    if info.is_main:
        try:
            if any(err.startswith("disk full") for err in errors):
                raise CheckpointError(str(_disk_full_error(save_dir, final.name, needed, _free_bytes(save_dir),
                                                           OSError(errno.ENOSPC, "; ".join(errors)))))
            if errors:
                raise CheckpointError(f"sharded checkpoint {final.name} could not be written: " + "; ".join(errors))
            files = {}
            for part, _ in gathered:
                files.update(part)
            on_disk = {f"{DCP_DIR}/{p.name}" for p in (tmp / DCP_DIR).iterdir()}
            if on_disk != set(files):
                raise CheckpointError(f"sharded checkpoint {final.name}: the ranks reported {sorted(files)} but the "
                                      f"folder holds {sorted(on_disk)}")
            torch.save(trainer_state, tmp / "trainer.pt")
            _fsync_file(tmp / "trainer.pt")
            files["trainer.pt"] = {"bytes": (tmp / "trainer.pt").stat().st_size, "sha256": _sha256(tmp / "trainer.pt")}
            meta = {"format_version": FORMAT_VERSION, "step": step, "config": config.to_dict(), "layout": LAYOUT,
                    "world_size": info.world_size, "files": files}
            with open(tmp / "meta.json", "w") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp / DCP_DIR)
            _fsync_dir(tmp)
            path = commit(tmp, final, keep_last, _before_commit)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"
            if not isinstance(e, Exception):
                raise
    error = D.broadcast_object(error, info)
    if error is not None:
        raise CheckpointError(error)
    return path


# ---------------------------------------------------------------- growth
def grow_gather_reshard(model: nn.Module, optimizer, op: str, *, make_optimizer, bf16: bool = False,
                        **grow_kwargs):
    """Gather-grow-reshard: every rank gathers the full model and AdamW state, grows them with the
    single-process `grow_model` (hence bit-equal to it), and shards the grown model in place again, keeping
    its slice of the grown state. Peak memory per rank: the full old and the full grown model and state.
    `make_optimizer(model, lr=...)` builds the run's AdamW. The reference of the tests and the baseline of
    benchmarks/bench_distributed.py; runs grow inside the shards (`grow_sharded`)."""
    from .growth import grow_model
    from .model import GPT

    msd, osd, names = gather_full(model, optimizer)
    msd.setdefault("lm_head.weight", msd["transformer.wte.weight"])
    device = next(iter(msd.values())).device
    plain = GPT(model.config, kernels_backend=getattr(model, "kernels_backend", "torch"))
    plain.load_state_dict(msd)
    del msd
    plain = plain.to(device).train()
    lr = optimizer.param_groups[0]["lr"]
    plain_opt = make_optimizer(plain, lr=lr)
    plain_opt.load_state_dict(state_in_layout(plain_opt, plain, osd, names))
    del osd
    grown, grown_opt = grow_model(plain, plain_opt, op, **grow_kwargs)
    del plain, plain_opt
    names = names_in_optimizer_order(grown, grown_opt)
    full_state = grown_opt.state_dict()
    del grown_opt
    shard(grown, bf16=bf16)
    sharded_opt = make_optimizer(grown, lr=lr)
    load_full(grown, sharded_opt, None, full_state, names)
    return grown, sharded_opt


def grow_sharded(model: nn.Module, optimizer, op: str, *, bf16: bool = False, width_noise: float = 0.0,
                 generator: torch.Generator | None = None, optimizer_step: int | None = None, target=None,
                 backend: str = "auto"):
    """Growth inside the shards: `grow_model`'s contract (same arguments, the old model and optimizer consumed,
    the new optimizer of the same class, param groups and hyperparameters) for a model sharded by `shard`.

    The grown model is built on the meta device and sharded (`bf16`: the run's mixed-precision policy), so
    it holds nothing yet; then, parameter by parameter in the model's order, each rank writes its own rows
    of the grown value and AdamW state (a collective: every rank calls it):
      * width: the old tensor is gathered whole (one at a time: the value, then each state tensor, each
        freed before the next; an embedding's rows grow from the same rows, so its own shard suffices) and
        the fused op writes the rank's destination rows; the noise E is drawn whole on every rank, so the
        generator advances exactly as in one process;
      * depth: a new layer's shard is the same rows of its source layer's: copied (or zeroed) locally, or
        taken over as is for the originals; nothing is gathered.
    Each old shard is freed as soon as it has been used (its storage released, even while the consumed old
    model still refers to it), so the per-rank peak is the grown shard plus one full old parameter and its
    state (and, with width_noise, the parameter's noise: twice its size, alive with the gathered value only)."""
    from .growth import apply as A

    with torch.no_grad():
        for m in model.modules():  # no parameter left unsharded by a forward without backward
            if is_sharded(m):
                m.reshard()
        new_config, groups, state, backend = A._consume(model, optimizer, op, width_noise, target, backend)
        new = shard(A._meta_gpt(new_config, model.kernels_backend), bf16=bf16)
        if op == "width":
            params, new_state = _grow_width_sharded(model, new, state, width_noise, generator, backend)
            renamed = {name: [name] for name in params}
        else:
            params, new_state, renamed = _grow_depth_sharded(model, new, state, op, backend)
        new_optimizer = A._finish(new, model, optimizer, groups, renamed, params, new_state, optimizer_step)
        left = [n for n, p in new.named_parameters() if p.to_local().is_meta]
        if left:
            raise RuntimeError(f"grow_sharded left parameters unset: {left}; a bug.")
        return new, new_optimizer


def shard_rows(t) -> tuple[int, int]:
    """[begin, end) of dim 0 held by this rank's local tensor of the FSDP2 parameter (or state) `t`: Shard(0)
    over a 1-D mesh splits like torch.chunk, ceil(N / world) rows per rank, the last ranks short or empty."""
    from torch.distributed.tensor import Shard

    if len(t.placements) != 1 or t.placements[0] != Shard(0):
        raise ValueError(f"expected a DTensor sharded on dim 0 over one mesh dimension, got {t.placements}")
    n, world = t.shape[0], t.device_mesh.size()
    chunk = -(-n // world)
    begin = min(n, t.device_mesh.get_local_rank() * chunk)
    end = min(n, begin + chunk)
    if t.to_local().shape[0] != end - begin:
        raise RuntimeError(f"the local shard has {t.to_local().shape[0]} rows of {n}, not rows [{begin}, {end}); "
                           f"this torch splits Shard(0) differently than staged_fast.sharded assumes")
    return begin, end


def _like(target, local: torch.Tensor):
    """`local` as this rank's shard of a DTensor laid out like `target` (no copy)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, target.device_mesh, target.placements, run_check=False, shape=target.shape,
                              stride=target.stride())


def _install(new: nn.Module, name: str, local: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    """Make `local` this rank's shard of the sharded meta-built `new`'s parameter `name`; returns the parameter.
    load_state_dict(assign=True) is how FSDP2 takes over a new sharded tensor (its post-load hook re-points its
    buffers at it; a short last shard is copied into FSDP's padded buffer)."""
    from .growth.apply import _owner

    module, leaf = _owner(new, name)
    module.load_state_dict({leaf: _like(module._parameters[leaf], local)}, strict=False, assign=True)
    param = module._parameters[leaf]
    param.requires_grad_(requires_grad)
    return param


def _free(t: torch.Tensor) -> None:
    """Release a consumed old shard's memory now, whoever still refers to it (the old model's FSDP buffers)."""
    t.untyped_storage().resize_(0)


def _grow_width_sharded(model: nn.Module, new: nn.Module, state: dict, width_noise: float, generator, backend: str):
    import dataclasses

    from .growth import fused as ops
    from .growth import index_maps as im
    from .growth.apply import _draw_noise, _scales, _state_tensors
    from .heap import release_free_heap

    named = dict(model.named_parameters())
    targets = dict(new.named_parameters())
    if width_noise and generator is None:
        generator = torch.Generator().manual_seed(0)  # as grow_model
    params, new_state = {}, {}
    for name in list(named):
        old = named.pop(name)
        rule = im.width_rule(name, tuple(old.shape), model.config.n_embd)
        tiling = im.dim0_tiling(rule)
        target = targets[name]
        rows = shard_rows(target)
        s = state.pop(name, {})
        keys = _state_tensors(s)
        sources = [old.detach()] + [s.pop(k) for k in keys]
        scales = _scales(rule, keys)
        local_shape = target.to_local().shape
        # Destination row i grows from source row i (an embedding): the rank's own source rows suffice.
        own_rows = tiling.row_halves == 1 and tiling.groups == 1 and shard_rows(old) == rows
        outs = []
        for i, src in enumerate(sources):  # the value, then each state tensor: one old tensor alive at a time
            local = src.to_local()
            whole = local if own_rows else src.full_tensor()  # a collective (every rank, every tensor)
            if whole.untyped_storage().data_ptr() != local.untyped_storage().data_ptr():
                _free(local)  # (one rank: full_tensor() may be the shard itself, which must live on)
            # drawn whole by every rank, after the gather (whose buffers are gone): the generator advances alike
            noise = _draw_noise(rule, width_noise, generator, old.device) if i == 0 else None
            out = torch.empty(local_shape, dtype=local.dtype, device=local.device)
            if not own_rows:
                ops.grow_tiles_([whole], [out], [scales[i]], tiling, noise, rows=rows, backend=backend)
            elif rows[1] > rows[0]:  # the same op on the rank's rows alone
                part = None if noise is None else noise.view(tiling.dst_rows, tiling.cols)[rows[0]:rows[1]]
                ops.grow_tiles_([local], [out], [scales[i]], dataclasses.replace(tiling, rows=rows[1] - rows[0]),
                                part, backend=backend)
            _free(local)
            del whole, local, noise
            release_free_heap()
            outs.append(out)
        del sources
        params[name] = _install(new, name, outs[0], old.requires_grad)
        if s or keys:
            s.update({k: _like(target, t) for k, t in zip(keys, outs[1:])})
            new_state[name] = s
    return params, new_state


def _grow_depth_sharded(model: nn.Module, new: nn.Module, state: dict, op: str, backend: str):
    from .growth.apply import _copy_tensors, _depth_moves, _inserted_state, _state_tensors

    named = dict(model.named_parameters())
    targets = dict(new.named_parameters())
    params, new_state, renamed = {}, {}, {}
    for new_name, old_name, scale in _depth_moves(list(named), model.config.n_layer, op):
        renamed.setdefault(old_name, []).append(new_name)
        old, target, s = named[old_name], targets[new_name], state.get(old_name, {})
        if shard_rows(old) != shard_rows(target):  # same shape, same mesh: cannot happen
            raise RuntimeError(f"{new_name} is not split like {old_name}; a bug.")
        keys = _state_tensors(s)
        if scale is None:  # an original layer (or a parameter outside the blocks): the shard itself moves
            local = old.to_local()
            params[new_name] = _install(new, new_name, local, old.requires_grad)
            if params[new_name].to_local().untyped_storage().data_ptr() != local.untyped_storage().data_ptr():
                _free(local)  # FSDP copied a short last shard into its padded buffer: the old one is spare
            if s:
                new_state[new_name] = dict(s, **{k: _like(target, s[k].to_local()) for k in keys})
            continue
        outs = _copy_tensors([old.to_local()] + [s[k].to_local() for k in keys], scale, backend)
        params[new_name] = _install(new, new_name, outs[0], old.requires_grad)
        if s:
            new_state[new_name] = _inserted_state(s, keys, [_like(target, t) for t in outs[1:]])
    return params, new_state, renamed
