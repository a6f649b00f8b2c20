"""torch.distributed set-up for the trainer: env:// (torchrun) or a single process.

The model is built for one device; `wrap` applies DDP from outside, and `unwrap` gives back the plain
module for checkpoints and growth (never a DDP-wrapped state_dict). Under --parallel fsdp the model is
sharded in place instead (staged_fast.sharded.shard, before the optimizer is built), and a single process
joins a one-rank process group so the same code runs.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.backend is not None


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA device is visible; use --device cpu.")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(requested)


def init(requested_device: str = "auto", parallel: str = "ddp") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE set), else run single-process (under
    --parallel fsdp in a one-rank group of its own: FSDP2 needs one)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":  # Triton launches on the current device, whatever its tensors' device is
        torch.cuda.set_device(device)
    if world_size == 1 and "RANK" not in os.environ:
        if parallel != "fsdp":
            return DistInfo(device=device)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        return DistInfo(0, 0, 1, device, backend)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(minutes=30))
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device, backend)


def close(info: DistInfo, *, barrier: bool = True) -> None:
    """Barrier then destroy: without the barrier rank 0 can abort at exit while others still talk. After a
    failure no barrier: the other ranks are elsewhere (in the update's collectives), or gone, and the barrier
    would fail again on top of the first error, or match their collective and hang."""
    if info.enabled and dist.is_initialized():
        try:
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()


# How a collective fails when another rank died: torch's distributed errors, and gloo's bare RuntimeErrors.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")


def lost_peer(error: BaseException, info: DistInfo) -> bool:
    """Whether `error` says another rank of this multi-rank job went away."""
    if not info.enabled or info.world_size == 1:
        return False
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(s in str(error) for s in _PEER_GONE))


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    if not info.enabled:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DDP) else model


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if `flag` is true on any rank (one all-reduce of a scalar, read on the host: on
    nccl a wait for the GPU, so a group of one, e.g. FSDP on one GPU, skips it)."""
    if not info.enabled or info.world_size == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class StopVote:
    """Whether any rank asked to stop, agreed by all ranks once per update without making the update wait for
    the GPU. Each call reads the vote the previous call started, then starts one with this rank's flag: an
    all-reduce (MAX) queued behind the update just launched, its result copied to pinned host memory with an
    event after it. Waiting for the previous call's event lets the GPU run the update just queued, where
    reading the new result at once (`any_rank`) waited for it to finish. So the ranks stop together one update
    after a request. Outside a multi-rank group the flag is its own answer, read at once."""

    def __init__(self, info: DistInfo):
        self.info = info
        self.lagged = info.enabled and info.world_size > 1
        self.started = False  # a vote is in flight (every call after the first)
        self.done: torch.cuda.Event | None = None  # recorded after the vote's copy to the host (CUDA)
        if self.lagged:
            self.flag = torch.zeros(1, dtype=torch.int32, device=info.device)
            # where the result is read: pinned memory on CUDA; on CPU (gloo) the flag itself
            cuda = info.device.type == "cuda"
            self.host = torch.zeros(1, dtype=torch.int32, pin_memory=True) if cuda else self.flag

    def __call__(self, flag: bool) -> bool:
        if not self.lagged:
            return any_rank(flag, self.info)
        agreed = self._read_previous()  # before the new vote overwrites flag and host
        self.flag.fill_(1 if flag else 0)  # a kernel argument: no host-to-device copy that could wait
        dist.all_reduce(self.flag, op=dist.ReduceOp.MAX)
        if self.host is not self.flag:
            self.host.copy_(self.flag, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        self.started = True
        return agreed

    def _read_previous(self) -> bool:
        if not self.started:
            return False
        if self.done is not None:
            self.done.synchronize()  # the previous update's work and vote, not the update just queued
        return bool(self.host.item())


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of a picklable object on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
