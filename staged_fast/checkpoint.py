"""Atomic, verifiable training checkpoints.

A checkpoint is a folder `<save_dir>/step_<8-digit update>/`:
  model.safetensors   the model's weights (our names; the tied lm_head is not stored twice)
  optimizer.pt        AdamW state_dict and the parameter names in its order (absent if not saved)
  trainer.pt          step, tokens, sampler position, scheduler and RNG states, run arguments
  meta.json           format version, model config, step, and the size and sha256 of every file

It is written into a temporary folder, every file fsync'ed, meta.json last, then renamed into place:
a crash at any moment leaves either the complete new checkpoint or none, and the previous one intact.
Loading checks meta.json's sizes and hashes, so a truncated or corrupted file is reported, not used; which
files must be there is fixed by the format (REQUIRED_FILES), not by meta.json. --keep_last pruning renames a
checkpoint out of the listing before deleting it, so a kill mid-delete never leaves a half-deleted one listed.
A write that finds the disk full (checked before writing, and recognized when it fails) removes its partial
folder and raises a CheckpointError naming the filesystem, the bytes needed and the bytes free.
Temporary folders (`.tmp-*`) of interrupted writes are removed at start by the run that owns the folder
(run_folder.remove_leftovers), never by a reader.

Under --parallel fsdp a checkpoint is sharded instead (meta.json `"layout": "dcp"`: `dcp/` written by every
rank with torch.distributed.checkpoint, `trainer.pt`, `meta.json`; same temporary folder, fsync, one rename
and verification; see staged_fast.sharded). `load_checkpoint` consolidates it into the full layout unless
asked not to (an fsdp run loads its own shards).
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import GPTConfig
from .optim import names_in_optimizer_order

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_PREFIX = ".tmp-"  # temporary folders: writes in progress, old copies being replaced or pruned
REQUIRED_FILES = ("model.safetensors", "trainer.pt")  # every checkpoint has them, listed and verified
OPTIONAL_FILES = ("optimizer.pt",)
SHARDED_REQUIRED_FILES = ("dcp/.metadata", "trainer.pt")  # meta.json "layout": "dcp"; every dcp/ file is listed  # absent when saved without an optimizer; if present, listed and verified
_NO_SPACE_SIGNS = ("No space left", "os error 28", "StorageFull", "Disk quota exceeded", "unexpected pos")


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
    def sharded(self) -> bool:
        """Written under --parallel fsdp (torch.distributed.checkpoint shards; see staged_fast.sharded)."""
        return self.meta.get("layout") == "dcp"

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
    tied = getattr(getattr(model, "config", None), "tie_embeddings", True)  # untied llama heads are stored
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or not tied}
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

    model_state = model_state_for_saving(model)
    optimizer_blob = None
    if optimizer is not None:
        optimizer_blob = {"state_dict": optimizer.state_dict(), "param_names": names_in_optimizer_order(model, optimizer)}
    trainer_state = dict(trainer_state or {})
    needed = _tensor_bytes(model_state) + _tensor_bytes(optimizer_blob) + _tensor_bytes(trainer_state) + (1 << 20)
    free = _free_bytes(save_dir)
    if free is not None and free < needed:
        raise _disk_full_error(save_dir, final.name, needed, free, None)

    files = {}
    try:
        tmp.mkdir()
        save_file(model_state, str(tmp / "model.safetensors"))
        files["model.safetensors"] = tmp / "model.safetensors"
        if optimizer_blob is not None:
            torch.save(optimizer_blob, tmp / "optimizer.pt")
            files["optimizer.pt"] = tmp / "optimizer.pt"
        torch.save(trainer_state, tmp / "trainer.pt")
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
    except BaseException as e:  # the partial folder would keep a full disk full: remove it, then say why
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and _is_no_space(e):
            raise _disk_full_error(save_dir, final.name, needed, _free_bytes(save_dir), e) from e
        raise
    return commit(tmp, final, keep_last, _before_commit)


def commit(tmp: Path, final: Path, keep_last: int | None = None, before_commit=None) -> Path:
    """Make a fully written, fsync'ed temporary checkpoint folder the checkpoint `final` in one rename
    (re-saving a step moves the old folder aside first), then prune to `keep_last`. Shared by the full
    and the sharded (torch.distributed.checkpoint) layouts."""
    save_dir = final.parent
    if before_commit is not None:  # test hook: simulate a crash before the rename
        before_commit(tmp)
    if final.exists() and _exchange(tmp, final):  # re-saving the same step: one atomic swap, then `tmp` is the old
        shutil.rmtree(tmp)
    elif final.exists():  # no swap here: the old one aside first (restore_moved_aside puts it back if killed)
        old = save_dir / f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(save_dir)
    if keep_last:
        prune(save_dir, keep_last)
    return final


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where it did not happen
    (the caller then renames twice)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library older than glibc 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    # any failure (EINVAL: the filesystem lacks it, EPERM: a seccomp profile blocks it, ...) leaves both paths
    # as they were: the caller's two renames then work, or raise the real error
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def restore_moved_aside(save_dir: str | os.PathLike) -> list[str]:
    """Re-saving a step moves the old checkpoint aside (`.tmp-old-<name>-<pid>`) before the new one is renamed in:
    killed between the two renames, that step was listed nowhere, and the leftover clean-up deleted the run's last
    checkpoint (the next start began afresh). The old copy is complete: it goes back under its name. Called by the
    folder's owner before it removes leftovers; returns the names restored."""
    save_dir = Path(save_dir)
    restored = []
    for old in sorted(save_dir.glob(f"{_TMP_PREFIX}old-*")):
        name = _moved_aside_name(old)
        if name and old.is_dir() and not (save_dir / name).exists():
            old.rename(save_dir / name)
            restored.append(name)
    if restored:
        _fsync_dir(save_dir)
    return restored


def prune(save_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (remove_checkpoints)."""
    remove_checkpoints(save_dir, list_checkpoints(save_dir)[:-keep_last])


def remove_checkpoints(save_dir: str | os.PathLike, checkpoints: list[Path]) -> None:
    """Delete these checkpoints of `save_dir`: each is first renamed out of the listing (one atomic rename), then
    deleted, so a kill mid-delete leaves a `.tmp-` folder, never a listed half-checkpoint."""
    save_dir = Path(save_dir)
    doomed = []
    for old in checkpoints:
        trash = save_dir / f"{_TMP_PREFIX}del-{old.name}-{os.getpid()}"
        old.rename(trash)
        doomed.append(trash)
    if doomed:
        _fsync_dir(save_dir)
    for trash in doomed:
        shutil.rmtree(trash, ignore_errors=True)


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors inside a (nested) state: what a checkpoint file of it needs, roughly. A DTensor
    counts its local shard (what this rank writes)."""
    if torch.is_tensor(obj):
        if hasattr(obj, "to_local"):
            obj = obj.to_local()
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _is_no_space(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, or how torch.save ('unexpected pos') and safetensors ('os error 28') report it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(sign in str(exc) for sign in _NO_SPACE_SIGNS)


def filesystem_of(path: str | os.PathLike) -> str:
    """'<mount point> (<type> on <device>)' of the filesystem that holds `path`."""
    mount = os.path.realpath(path)
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    kind = None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and fields[1].replace("\\040", " ") == mount:
                    kind = f"{fields[2]} on {fields[0]}"  # the last entry for a mount point is the visible one
    except OSError:
        pass
    return f"{mount} ({kind})" if kind else mount


def _human(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _disk_full_error(save_dir: Path, name: str, needed: int, free: int | None, cause) -> CheckpointError:
    found = list_checkpoints(save_dir)
    earlier = f"the newest intact one is {found[-1].name}" if found else "there are none in it yet"
    free_text = "an unknown number of bytes free" if free is None else f"{free:,} bytes free ({_human(free)})"
    how = "" if cause is None else f" (writing it failed with {type(cause).__name__}: {str(cause).strip()[:200]})"
    return CheckpointError(
        f"disk full: checkpoint {name} cannot be written to {save_dir}{how}: the filesystem "
        f"{filesystem_of(save_dir)} has {free_text} and the checkpoint needs about {needed:,} bytes "
        f"({_human(needed)}). Nothing of it was left behind and earlier checkpoints are intact ({earlier}). "
        f"Free space on that filesystem (or lower --keep_last), or write to another one, then continue the run "
        f"with --resume latest."
    )


def list_checkpoints(save_dir: str | os.PathLike, moved_aside: bool = False) -> list[Path]:
    """Complete checkpoints in `save_dir`, oldest first (temporary folders of crashed writes are ignored).
    `moved_aside`: also a step a killed re-save left moved aside (`.tmp-old-<name>-<pid>`, its name missing),
    which the folder's owner puts back at its start: what a reader before that (the command's parsing) sees."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    by_name = {p.name: p for p in save_dir.iterdir()
               if p.is_dir() and _STEP_DIR.match(p.name) and (p / "meta.json").exists()}
    if moved_aside:
        for old in save_dir.glob(f"{_TMP_PREFIX}old-*"):
            name = _moved_aside_name(old)
            if name and name not in by_name and (old / "meta.json").exists():
                by_name[name] = old
    return [by_name[name] for name in sorted(by_name, key=lambda n: int(_STEP_DIR.match(n).group(1)))]


def _moved_aside_name(path: Path) -> str | None:
    """The step name of a folder a re-save moved aside (`.tmp-old-<name>-<pid>`), else None."""
    m = re.fullmatch(rf"{re.escape(_TMP_PREFIX)}old-(.+)-\d+", path.name)
    return m[1] if m and _STEP_DIR.match(m[1]) else None


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
        f"written by staged_fast.train, or its run folder (train's --resume also takes 'latest' with --save_prefix)."
    )


def _verify(path: Path, meta: dict) -> None:
    files = meta["files"]
    sharded = meta.get("layout") == "dcp"
    required_files = SHARDED_REQUIRED_FILES if sharded else REQUIRED_FILES
    present = [f"dcp/{p.name}" for p in (path / "dcp").iterdir()] if sharded and (path / "dcp").is_dir() else []
    for name in (*required_files, *(() if sharded else OPTIONAL_FILES), *present):
        required = name in required_files or (path / name).exists()
        if required and name not in files:
            raise CheckpointError(
                f"checkpoint {path} is damaged: its meta.json does not list {name} (size and sha256), so the file "
                f"cannot be verified. Use an earlier checkpoint in {path.parent}."
            )
    for name, info in files.items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing. Use an earlier checkpoint.")
        if f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {name} does not match the size/sha256 recorded when it was "
                f"written (truncated or modified). Use an earlier checkpoint in {path.parent}."
            )


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path / 'meta.json'} ({e}); the checkpoint is damaged.") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / 'meta.json'} is not a JSON object; the checkpoint is damaged.")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}; this staged_fast reads version {FORMAT_VERSION}."
        )
    problems = [f"'{key}' is missing or not {what}" for key, kind, what in (
        ("step", int, "an integer"), ("config", dict, "an object"), ("files", dict, "an object"))
        if not isinstance(meta.get(key), kind)]
    for name, info in meta.get("files", {}).items() if isinstance(meta.get("files"), dict) else ():
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)):
            problems.append(f"the entry of {name!r} in 'files' has no integer 'bytes' and string 'sha256'")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} is damaged: in its meta.json {'; '.join(problems)}. Use an earlier "
            f"checkpoint in {path.parent}."
        )
    return meta


def load_checkpoint(path: str | os.PathLike, *, load_optimizer: bool = True, verify: bool = True,
                    consolidate: bool = True) -> Checkpoint:
    """A verified checkpoint. A sharded one (--parallel fsdp) is consolidated into full states in this process,
    unless consolidate=False (then model_state/optimizer_state are None: a sharded run loads its own shards)."""
    path = Path(path)
    meta = read_meta(path)
    if verify:
        _verify(path, meta)
    try:
        config = GPTConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"checkpoint {path} is damaged: the config in its meta.json is invalid ({e}).") from e
    optimizer_state, param_names = None, None
    if meta.get("layout") == "dcp":
        model_state = None
        if consolidate:
            from .sharded import consolidate as _consolidate

            model_state, optimizer_state, param_names = _consolidate(path, load_optimizer=load_optimizer)
            model_state.setdefault("lm_head.weight", model_state["transformer.wte.weight"])
    else:
        model_state = load_file(str(path / "model.safetensors"))
        model_state.setdefault("lm_head.weight", model_state["transformer.wte.weight"])  # tied unless stored
    if meta.get("layout") != "dcp" and load_optimizer and (path / "optimizer.pt").exists():
        blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        optimizer_state, param_names = blob["state_dict"], blob["param_names"]
    trainer_state = read_trainer_state(path)
    return Checkpoint(path, config, model_state, optimizer_state, param_names, trainer_state, meta)


def read_trainer_state(path: str | os.PathLike) -> dict:
    """The trainer's state of a checkpoint (step, schedule, sampler, RNG, the flags it ran with) without its
    tensors: trainer.pt is small, read before the model is (a continued run takes its flags from it)."""
    try:
        return torch.load(Path(path) / "trainer.pt", map_location="cpu", weights_only=False)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"cannot read {Path(path) / 'trainer.pt'} ({e}); the checkpoint is damaged. Use "
                              f"an earlier one (a step_<8-digit update> folder) or delete this one.") from e


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
