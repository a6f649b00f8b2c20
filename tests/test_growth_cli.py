"""Offline growth round trip: save a trained checkpoint, grow it with the CLI, load it, logits preserved,
HF export of the grown model matches; a checkpoint without optimizer state grows weights only."""
import logging

import pytest
import torch

from staged_fast import GPT, GPTConfig
from staged_fast import grow as grow_cli
from staged_fast.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from staged_fast.growth import STATE_ABSENT, grow_checkpoint, model_from_state, optimizer_from_state

CFG = GPTConfig(n_layer=2, n_embd=64, n_head=2, vocab_size=131, n_positions=32, dropout=0.0, attn_dropout=0.0)


def _trained_checkpoint(tmp_path, with_optimizer=True):
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, CFG.vocab_size, (2, 16))
    for _ in range(2):
        opt.zero_grad()
        model(x, x).backward()
        opt.step()
    path = save_checkpoint(tmp_path / "small", step=2, model=model, config=CFG,
                           optimizer=opt if with_optimizer else None, trainer_state={"tokens": 64})
    model.eval()
    with torch.no_grad():
        return path, x, model(x)


@pytest.mark.parametrize("op_args", [["--op", "width", "--width_noise", "0.01"], ["--op", "depth"]])
def test_cli_round_trip_and_hf_export(tmp_path, op_args):
    path, x, logits = _trained_checkpoint(tmp_path)
    assert grow_cli.main([str(path), *op_args, "--out", str(tmp_path / "grown")]) == 0
    ckpt = load_checkpoint(resolve_checkpoint(tmp_path / "grown"))
    assert ckpt.step == 2 and ckpt.trainer_state["tokens"] == 64 and ckpt.trainer_state["grown_from"]["op"]
    model = model_from_state(ckpt.config, ckpt.model_state)
    opt = optimizer_from_state(model, ckpt.optimizer_state, ckpt.param_names)
    assert len(opt.state) == len(list(model.parameters()))
    model.eval()
    with torch.no_grad():
        grown_logits = model(x)
    assert ((grown_logits - logits).abs().max() / logits.abs().max()).item() < 1e-5
    from staged_fast.hf import to_hf

    hf = to_hf(model).eval()
    with torch.no_grad():
        hf_logits = hf(x).logits
    torch.testing.assert_close(hf_logits, grown_logits, rtol=1e-4, atol=1e-4)


def test_checkpoint_without_optimizer_state_grows_weights(tmp_path, caplog, capsys):
    path, x, logits = _trained_checkpoint(tmp_path, with_optimizer=False)
    with caplog.at_level(logging.WARNING, logger="staged_fast.growth"):
        config, model, opt = grow_checkpoint(load_checkpoint(path), "width")
    assert opt is None and config.n_embd == 128 and STATE_ABSENT in caplog.text
    assert grow_cli.main([str(path), "--op", "width", "--out", str(tmp_path / "g")]) == 0
    assert STATE_ABSENT in capsys.readouterr().out


def test_cli_rejects_non_doubling_target(tmp_path, capsys):
    path, _, _ = _trained_checkpoint(tmp_path)
    assert grow_cli.main([str(path), "--op", "width", "--target", "GPT2_large", "--out", str(tmp_path / "g")]) == 2
    assert "not the requested" in capsys.readouterr().err


def _snapshot(folder):
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_holding_another_run_is_refused_unless_overwrite(tmp_path, capsys):
    from staged_fast.checkpoint import list_checkpoints

    path, _, _ = _trained_checkpoint(tmp_path)
    other = tmp_path / "other_run"
    save_checkpoint(other, step=7, model=GPT(CFG), config=CFG)  # another run, further along
    (other / "metrics.jsonl").write_text('{"step": 7}\n')
    before = _snapshot(other)
    assert grow_cli.main([str(path), "--op", "width", "--out", str(other)]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "not empty" in err and "--overwrite" in err
    assert _snapshot(other) == before
    assert grow_cli.main([str(path), "--op", "width", "--out", str(other), "--overwrite"]) == 0
    assert [p.name for p in list_checkpoints(other)] == ["step_00000002"]  # the grown one, and nothing else
    assert load_checkpoint(resolve_checkpoint(other)).config.n_embd == 128
    assert not (other / "metrics.jsonl").exists()


@pytest.mark.parametrize("case", ["missing", "truncated", "out_is_file", "out_is_source"])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, case):
    path, _, _ = _trained_checkpoint(tmp_path)
    out = tmp_path / "grown"
    fragment = {"missing": "not a staged_fast checkpoint", "truncated": "corrupt", "out_is_file": "is a file",
                "out_is_source": "holds the checkpoint being grown"}[case]
    if case == "missing":
        path = tmp_path / "nope" / "step_00000002"
    elif case == "truncated":
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:500])
    elif case == "out_is_file":
        out.write_text("notes")
    else:
        out = path.parent
    before = _snapshot(tmp_path)
    overwrite = ["--overwrite"] if case == "out_is_source" else []  # refused even so
    code = grow_cli.main([str(path), "--op", "width", "--out", str(out), *overwrite])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and fragment in err, err
    assert _snapshot(tmp_path) == before
    assert out.exists() == (case in ("out_is_file", "out_is_source"))
