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

Growth under fsdp is gather-grow-reshard (`gather_full` + the unchanged single-process `grow_model` + a fresh
`fully_shard`): every rank briefly holds the full old model and state and the full grown ones; the result is
the single-process growth bit for bit. Growth inside the shards (each rank building only its own rows) is
not implemented yet.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

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
def load_sharded(path: str | os.PathLike, model: nn.Module, optimizer=None) -> None:
    """Each rank reads its own shards (any number of ranks wrote them) into the sharded model/optimizer."""
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
        _TMP_PREFIX, FORMAT_VERSION, CheckpointError, _fsync_dir, _fsync_file, _is_no_space, _sha256, commit,
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

    mine, local_error = {}, None
    try:
        msd, osd = get_state_dict(model, optimizer)
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
def grow_gather_reshard(model: nn.Module, optimizer, op: str, *, make_optimizer, bf16: bool = False, check=None,
                        **grow_kwargs):
    """Gather-grow-reshard: every rank gathers the full model and AdamW state, grows them with the
    single-process `grow_model` (hence bit-equal to it), and shards the grown model in place again, keeping
    its slice of the grown state. Peak memory per rank: the full old and the full grown model and state.
    `make_optimizer(model, lr=...)` builds the run's AdamW; `check(model, optimizer)` sees the full grown ones."""
    from .growth import grow_model
    from .model import GPT

    msd, osd, names = gather_full(model, optimizer)
    msd.setdefault("lm_head.weight", msd["transformer.wte.weight"])
    device = next(iter(msd.values())).device
    plain = GPT(model.config, kernels_backend=getattr(model, "kernels_backend", "torch"))
    plain.load_state_dict(msd)
    del msd
    plain = plain.to(device).train()
    if names != [n for n, _ in plain.named_parameters()]:
        raise RuntimeError(f"gathered optimizer state is for parameters {names[:3]}..., not this model's; a bug.")
    lr = optimizer.param_groups[0]["lr"]
    plain_opt = make_optimizer(plain, lr=lr)
    plain_opt.load_state_dict(osd)
    del osd
    grown, grown_opt = grow_model(plain, plain_opt, op, **grow_kwargs)
    del plain, plain_opt
    if check is not None:
        check(grown, grown_opt)
    ids = {id(p): n for n, p in grown.named_parameters()}
    names = [ids[id(p)] for g in grown_opt.param_groups for p in g["params"]]
    full_state = grown_opt.state_dict()
    del grown_opt
    shard(grown, bf16=bf16)
    sharded_opt = make_optimizer(grown, lr=lr)
    load_full(grown, sharded_opt, None, full_state, names)
    return grown, sharded_opt
