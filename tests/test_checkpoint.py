"""Atomic checkpoints: a crash mid-write leaves the previous one loadable; corruption is detected."""
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


def test_truncated_file_is_reported(tmp_path):
    cfg, model, opt = _setup()
    path = save_checkpoint(tmp_path, step=1, model=model, config=cfg, optimizer=opt)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt: model.safetensors"):
        load_checkpoint(path)


def test_flipped_byte_is_reported(tmp_path):
    cfg, model, opt = _setup()
    path = save_checkpoint(tmp_path, step=1, model=model, config=cfg, optimizer=opt)
    raw = bytearray((path / "optimizer.pt").read_bytes())
    raw[-100] ^= 0xFF
    (path / "optimizer.pt").write_bytes(bytes(raw))
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
