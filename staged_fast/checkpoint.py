"""Atomic, verifiable training checkpoints.

A checkpoint is a folder `<save_dir>/step_<8-digit update>/`:
  model.safetensors   the model's weights (our names; the tied lm_head is not stored twice)
  optimizer.pt        AdamW state_dict and the parameter names in its order (absent if not saved)
  trainer.pt          step, tokens, sampler position, scheduler and RNG states, run arguments
  meta.json           format version, model config, step, and the size and sha256 of every file

It is written into a temporary folder, every file fsync'ed, meta.json last, then renamed into place:
a crash at any moment leaves either the complete new checkpoint or none, and the previous one intact.
Loading checks meta.json's sizes and hashes, so a truncated or corrupted file is reported, not used.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import GPTConfig

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


@dataclass
class Checkpoint:
    path: Path
    config: GPTConfig
    model_state: dict
    optimizer_state: dict | None
    param_names: list[str] | None
    trainer_state: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def step(self) -> int:
        """The number the folder is named by (the trainer uses its monotone update count)."""
        return int(self.meta["step"])


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return state


def save_checkpoint(
    save_dir: str | os.PathLike,
    *,
    step: int,
    model: torch.nn.Module,
    config: GPTConfig,
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: dict | None = None,
    keep_last: int | None = None,
    _before_commit=None,
) -> Path:
    """Write `<save_dir>/step_<step>` atomically and return it. `model` must be unwrapped (no DDP).

    `trainer_state` is stored as given (the trainer keeps its schedule step counter there, which a
    growth with --restart_steps can move backwards; `step` here must only grow)."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    final = save_dir / f"step_{step:08d}"
    tmp = save_dir / f"{_TMP_PREFIX}step_{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    files = {}
    save_file(model_state_for_saving(model), str(tmp / "model.safetensors"))
    files["model.safetensors"] = tmp / "model.safetensors"
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        torch.save({"state_dict": optimizer.state_dict(), "param_names": order}, tmp / "optimizer.pt")
        files["optimizer.pt"] = tmp / "optimizer.pt"
    torch.save(dict(trainer_state or {}), tmp / "trainer.pt")
    files["trainer.pt"] = tmp / "trainer.pt"
    for path in files.values():
        _fsync_file(path)
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "config": config.to_dict(),
        "files": {name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for name, p in files.items()},
    }
    meta_path = tmp / "meta.json"
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if _before_commit is not None:  # test hook: simulate a crash before the rename
        _before_commit(tmp)
    if final.exists():  # re-saving the same step: move the old one aside first, then swap
        old = save_dir / f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(save_dir)
    if keep_last:
        for old in list_checkpoints(save_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(save_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `save_dir`, oldest first (temporary folders of crashed writes are ignored)."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [p for p in save_dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def resolve_checkpoint(path: str | os.PathLike, save_dir: str | os.PathLike | None = None) -> Path:
    """'latest' (the newest in save_dir), a checkpoint folder, or a run folder (its newest)."""
    if str(path) == "latest":
        if save_dir is None:
            raise CheckpointError("--resume latest needs --save_prefix (the run folder to look in).")
        found = list_checkpoints(save_dir)
        if not found:
            raise CheckpointError(
                f"--resume latest: no complete checkpoint in {save_dir}. Start without --resume, "
                f"or point --save_prefix at the run you want to continue."
            )
        return found[-1]
    p = Path(path)
    if (p / "meta.json").exists():
        return p
    found = list_checkpoints(p)
    if found:
        return found[-1]
    raise CheckpointError(
        f"{p} is not a staged_fast checkpoint (no meta.json) and holds none. Give a step_<8-digit update> folder "
        f"written by staged_fast.train, its run folder, or 'latest' with --save_prefix."
    )


def _verify(path: Path, meta: dict) -> None:
    for name, info in meta.get("files", {}).items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing. Use an earlier checkpoint.")
        if f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {name} does not match the size/sha256 recorded when it was "
                f"written (truncated or modified). Resume from an earlier checkpoint in {path.parent}."
            )


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path / 'meta.json'} ({e}); the checkpoint is damaged.") from e
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}; this staged_fast reads version {FORMAT_VERSION}."
        )
    return meta


def load_checkpoint(path: str | os.PathLike, *, load_optimizer: bool = True, verify: bool = True) -> Checkpoint:
    path = Path(path)
    meta = read_meta(path)
    if verify:
        _verify(path, meta)
    config = GPTConfig.from_dict(meta["config"])
    model_state = load_file(str(path / "model.safetensors"))
    model_state["lm_head.weight"] = model_state["transformer.wte.weight"]
    optimizer_state, param_names = None, None
    if load_optimizer and (path / "optimizer.pt").exists():
        blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        optimizer_state, param_names = blob["state_dict"], blob["param_names"]
    trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    return Checkpoint(path, config, model_state, optimizer_state, param_names, trainer_state, meta)


def load_model(path: str | os.PathLike, *, kernels_backend: str = "torch", device="cpu"):
    """A GPT in eval mode from a staged_fast checkpoint (folder or run folder) or a HF GPT2LMHeadModel folder/name."""
    from .model import GPT

    p = Path(path)
    if (p / "config.json").exists() and not (p / "meta.json").exists():
        from .hf import load_pretrained

        return load_pretrained(p, kernels_backend).to(device).eval()
    if not p.exists() and str(path).count("/") <= 1:  # a hub name like "gpt2"
        from .hf import load_pretrained

        return load_pretrained(str(path), kernels_backend).to(device).eval()
    ckpt = load_checkpoint(resolve_checkpoint(p), load_optimizer=False)
    model = GPT(ckpt.config, kernels_backend=kernels_backend)
    model.load_state_dict(ckpt.model_state)
    return model.to(device).eval()
