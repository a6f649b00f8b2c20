"""Atomic checkpoints: a crash mid-write leaves the previous one loadable; corruption is detected."""
import json
import os
import re
from pathlib import Path

import pytest
import torch

from staged_fast.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_model,
    resolve_checkpoint,
    save_checkpoint,
)
from staged_fast.config import GPTConfig
from staged_fast.model import GPT


def _setup():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=16, dropout=0.0, attn_dropout=0.0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8))).backward()
    opt.step()
    return cfg, model, opt


def test_roundtrip(tmp_path):
    cfg, model, opt = _setup()
    path = save_checkpoint(tmp_path, step=5, model=model, config=cfg, optimizer=opt, trainer_state={"x": 1})
    ck = load_checkpoint(path)
    assert ck.step == 5 and ck.config == cfg and ck.trainer_state == {"x": 1}
    assert ck.param_names == [n for n, _ in model.named_parameters()]
    for k, v in model.state_dict().items():
        assert torch.equal(ck.model_state[k], v)
    assert torch.equal(ck.optimizer_state["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(load_model(tmp_path).transformer.wte.weight, model.transformer.wte.weight)


def test_crash_during_write_keeps_previous(tmp_path):
    cfg, model, opt = _setup()
    save_checkpoint(tmp_path, step=1, model=model, config=cfg, optimizer=opt)

    def crash(tmp_dir):
        raise KeyboardInterrupt("power cut")

    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, step=2, model=model, config=cfg, optimizer=opt, _before_commit=crash)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    latest = resolve_checkpoint("latest", tmp_path)
    ck = load_checkpoint(latest)
    assert ck.step == 1
    assert not torch.equal(ck.model_state["transformer.wte.weight"], model.transformer.wte.weight)


def test_crash_while_resaving_same_step_keeps_old(tmp_path):
    cfg, model, opt = _setup()
    save_checkpoint(tmp_path, step=3, model=model, config=cfg)
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, step=3, model=model, config=cfg,
                        _before_commit=lambda d: (_ for _ in ()).throw(RuntimeError("crash")))
    load_checkpoint(tmp_path / "step_00000003")


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_resaving_a_step_replaces_it_whole(tmp_path, monkeypatch, swap):
    """A re-save swaps the new folder in: by one atomic exchange (Linux renameat2), or where the filesystem lacks
    it by moving the old one aside first; either way the step holds the new state and nothing is left over."""
    import staged_fast.checkpoint as checkpoint_mod

    real, swapped = checkpoint_mod._exchange, []

    def exchange(a, b):
        swapped.append(real(a, b) if swap == "exchange" else False)
        return swapped[-1]
    monkeypatch.setattr(checkpoint_mod, "_exchange", exchange)
    cfg, model, opt = _setup()
    save_checkpoint(tmp_path, step=3, model=model, config=cfg, trainer_state={"attempt": 1})
    save_checkpoint(tmp_path, step=3, model=model, config=cfg, trainer_state={"attempt": 2})
    assert swapped == [swap == "exchange"]  # Linux (glibc 2.28+, a local filesystem): the atomic swap was used
    assert load_checkpoint(tmp_path / "step_00000003").trainer_state == {"attempt": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]


def test_a_step_moved_aside_by_a_killed_resave_is_restored(tmp_path):
    """Killed between the two renames (no exchange), the step was listed nowhere and the leftover clean-up
    deleted the run's last checkpoint: the folder's owner puts the complete old copy back first."""
    from staged_fast.checkpoint import restore_moved_aside

    cfg, model, opt = _setup()
    save_checkpoint(tmp_path, step=2, model=model, config=cfg)
    save_checkpoint(tmp_path, step=3, model=model, config=cfg, trainer_state={"attempt": 1})
    (tmp_path / "step_00000003").rename(tmp_path / ".tmp-old-step_00000003-4242")
    (tmp_path / ".tmp-old-step_00000002-17").mkdir()  # its step is listed: a swap that completed, left to delete
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002"]
    assert restore_moved_aside(tmp_path) == ["step_00000003"]
    assert load_checkpoint(resolve_checkpoint("latest", tmp_path)).trainer_state == {"attempt": 1}
    assert (tmp_path / ".tmp-old-step_00000002-17").exists()


def test_truncated_file_is_reported(tmp_path):
    cfg, model, opt = _setup()
    path = save_checkpoint(tmp_path, step=1, model=model, config=cfg, optimizer=opt)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt: model.safetensors"):
        load_checkpoint(path)


def _flip_byte(file, offset: int) -> None:
    raw = bytearray(file.read_bytes())
    raw[offset] ^= 0xFF
    file.write_bytes(bytes(raw))


def test_flipped_byte_is_reported(tmp_path):
    cfg, model, opt = _setup()
    path = save_checkpoint(tmp_path, step=1, model=model, config=cfg, optimizer=opt)
    _flip_byte(path / "optimizer.pt", -100)
    with pytest.raises(CheckpointError, match="corrupt: optimizer.pt"):
        load_checkpoint(path)


def test_keep_last(tmp_path):
    cfg, model, _ = _setup()
    for s in range(1, 6):
        save_checkpoint(tmp_path, step=s, model=model, config=cfg, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a staged_fast checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint("latest", tmp_path)


def test_kill_during_pruning_never_lists_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    import shutil

    cfg, model, opt = _setup()
    for s in (1, 2):
        save_checkpoint(tmp_path, step=s, model=model, config=cfg, optimizer=opt)

    def killed(path, *args, **kwargs):  # the process dies after deleting one file of the folder
        (Path(path) / "model.safetensors").unlink()
        raise KeyboardInterrupt("kill -9")

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, step=3, model=model, config=cfg, optimizer=opt, keep_last=1)
    monkeypatch.undo()
    listed = list_checkpoints(tmp_path)
    assert listed[-1].name == "step_00000003"
    for p in listed:
        load_checkpoint(p)  # every listed checkpoint is complete


def _edit_meta(path, edit):
    meta = json.loads((path / "meta.json").read_text())
    edit(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def test_required_files_are_fixed_by_the_format_not_by_meta(tmp_path):
    cfg, model, opt = _setup()
    path = save_checkpoint(tmp_path, step=1, model=model, config=cfg, optimizer=opt)
    _edit_meta(path, lambda m: m.update(files={}))
    _flip_byte(path / "model.safetensors", -10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path)


def test_unlisted_optimizer_state_is_refused(tmp_path):
    cfg, model, opt = _setup()
    path = save_checkpoint(tmp_path, step=1, model=model, config=cfg, optimizer=opt)
    _edit_meta(path, lambda m: m["files"].pop("optimizer.pt"))
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize("key", ["config", "files", "step"])
def test_meta_without_a_key_is_a_checkpoint_error(tmp_path, key):
    cfg, model, opt = _setup()
    path = save_checkpoint(tmp_path, step=1, model=model, config=cfg, optimizer=opt)
    _edit_meta(path, lambda m: m.pop(key))
    with pytest.raises(CheckpointError, match=f"'{key}'"):
        load_checkpoint(path)


def _mount_point(path) -> str:
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def test_disk_full_before_writing_is_reported_and_nothing_is_left(tmp_path, monkeypatch):
    import shutil

    cfg, model, opt = _setup()
    first = save_checkpoint(tmp_path, step=1, model=model, config=cfg, optimizer=opt)
    total = 10**9
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(total, total - 1000, 1000))
    _assert_disk_full_reported(tmp_path, monkeypatch, first, model, cfg, opt, free="1,000 bytes free")


def test_disk_full_during_write_removes_the_partial_folder(tmp_path, monkeypatch):
    cfg, model, opt = _setup()
    first = save_checkpoint(tmp_path, step=1, model=model, config=cfg, optimizer=opt)

    def full(obj, f, *args, **kwargs):  # what torch.save raises when the disk fills mid-write
        Path(f).write_bytes(b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 832 vs 726")

    monkeypatch.setattr(torch, "save", full)
    _assert_disk_full_reported(tmp_path, monkeypatch, first, model, cfg, opt, free="bytes free")


def _assert_disk_full_reported(tmp_path, monkeypatch, first, model, cfg, opt, free: str) -> None:
    """Saving step 2 fails with a message naming the filesystem, the bytes needed and free; nothing of
    it is left, and step 1 still loads."""
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(tmp_path, step=2, model=model, config=cfg, optimizer=opt)
    msg = str(info.value)
    assert "full" in msg and _mount_point(tmp_path) in msg and free in msg
    assert re.search(r"needs about [\d,]+ bytes", msg), msg
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["step_00000001"]
    load_checkpoint(first)
