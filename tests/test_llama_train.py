"""--arch llama through the real entry points: flags, in-run growth, offline grow + resume, --schedule,
--grow_when slope, the demo command line, evaluate on a llama checkpoint."""
import json
import math
from pathlib import Path

import pytest
import torch

from staged_fast.checkpoint import list_checkpoints, load_checkpoint, load_model
from staged_fast.config import ConfigError, initial_lr, initial_lr_for, preset_config
from staged_fast.metrics import read_metrics
from staged_fast.train_args import DEMO_ARGV, UsageError, demo_argv, model_config, parse_args, peak_lr
from train_utils import train

START = ["--arch", "llama", "--size", "llama_tiny_div2_width", "--dropout", "0"]
FIXTURES = Path(__file__).parent / "fixtures"


def _growths(run):
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "growth"]


def _updates(run):
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r and "event" not in r]


def test_flags_presets_and_lr_heuristic(tmp_path):
    common = ["--save_prefix", str(tmp_path / "r")]
    a = parse_args(["--arch", "llama", "--n_layer", "3", "--n_embd", "192", "--n_head", "2", "--n_kv_head", "1",
                    "--rope_theta", "5e5", "--tie_embeddings", "false", *common])
    cfg = model_config(a, vocab_size=100)
    assert (cfg.arch, cfg.n_kv_head, cfg.intermediate_size, cfg.rope_theta, cfg.tie_embeddings) == (
        "llama", 1, 512, 5e5, False)
    assert peak_lr(a, cfg) == pytest.approx(0.003239 - 0.0001395 * math.log10(cfg.n_params_non_embedding))
    b = parse_args(["--size", "llama_small", *common])  # a llama preset implies --arch llama
    assert model_config(b, vocab_size=100).shape_str() == "4L/256d/8H/4KV/640F"
    gpt = parse_args(["--size", "tiny", *common])  # GPT-2 unchanged
    cfg = model_config(gpt, vocab_size=100)
    assert cfg.arch == "gpt2" and peak_lr(gpt, cfg) == initial_lr(2, 128) == initial_lr_for(cfg)
    with pytest.raises(UsageError, match="--arch llama only"):
        parse_args(["--size", "tiny", "--n_kv_head", "1", *common])
    with pytest.raises(ConfigError, match="multiple of n_kv_head"):
        parse_args(["--arch", "llama", "--size", "llama_tiny", "--n_kv_head", "3", *common])
    with pytest.raises(UsageError, match="llama preset"):
        parse_args(["--arch", "gpt2", "--size", "llama_tiny", *common])
    assert demo_argv([]) == DEMO_ARGV and demo_argv(["--arch", "gpt2"]) == DEMO_ARGV
    llama_demo = demo_argv(["--arch", "llama"])
    assert llama_demo[:4] == ["--arch", "llama", "--size", "llama_tiny_div2_width"] and "--grow_at" in llama_demo
    assert demo_argv(["--arch", "llama", "--size", "llama_tiny"]) is None
    parse_args(llama_demo + common)


def test_in_run_width_growth_then_offline_depth_growth_and_resume(tmp_path, data_cache):
    run = tmp_path / "run"
    assert train(run, data_cache, *START, "--train_steps", "6", "--grow_at", "3", "--grow_ops", "width",
                 "--restart_steps", "2", "--width_noise", "0.01") == 0
    (event,) = _growths(run)
    assert event["old_size"] == "2L/64d/2H/1KV/192F" and event["new_size"] == "2L/128d/4H/2KV/384F"
    assert abs(event["loss_after"] - event["loss_before"]) < 1e-5 * event["loss_before"]
    ck = load_checkpoint(list_checkpoints(run)[-1])
    assert ck.config.arch == "llama" and ck.config.n_kv_head == 2
    from staged_fast.grow import main as grow_main

    out = tmp_path / "deep"
    assert grow_main([str(run), "--op", "depth", "--depth_mode", "append_id", "--out", str(out)]) == 0
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        a, b = load_model(run)(idx), load_model(out)(idx)
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5
    cont = tmp_path / "cont"
    assert train(cont, data_cache, *START, "--train_steps", "8", "--resume", str(out), "--restart_steps", "5",
                 "--reset_lr_scheduler") == 0
    ups = _updates(cont)
    assert [u["step"] for u in ups] == [6, 7, 8] and ups[0]["n_layer"] == 4


def test_untied_offline_width_growth_via_doubling(tmp_path, data_cache):
    small = tmp_path / "small"
    assert train(small, data_cache, *START, "--tie_embeddings", "false", "--train_steps", "3") == 0
    grown = tmp_path / "grown"
    assert train(grown, data_cache, *START, "--tie_embeddings", "false", "--train_steps", "5", "--resume", str(small),
                 "--doubling", "weights") == 0
    first = load_checkpoint(list_checkpoints(grown)[0])
    assert first.config.n_embd == 128 and not first.config.tie_embeddings
    assert "lm_head.weight" in first.model_state and first.model_state["lm_head.weight"].shape == (50257, 128)
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        a, b = load_model(list_checkpoints(small)[-1])(idx), load_model(first.path)(idx)
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5


@pytest.mark.parametrize("target,flags,new_size", [
    ("llama_tiny", [], "2L/128d/4H/2KV/384F"),  # a llama plan starts a llama run at its first stage
    ("tiny", ["--arch", "llama", "--n_kv_head", "1"], "2L/128d/2H/2KV/384F"),  # a GPT-2 plan's shapes, llama flags
])
def test_plan_drives_llama_growth(tmp_path, data_cache, target, flags, new_size):
    from staged_fast.schedule import plan_for_run

    plan = plan_for_run(target, ["width"], train_steps=6)
    path = tmp_path / "plan.json"
    plan.to_json(str(path))
    run = tmp_path / "run"
    assert train(run, data_cache, *flags, "--dropout", "0", "--schedule", str(path)) == 0
    (event,) = _growths(run)
    (g,) = plan.growths()
    assert event["iteration"] == g["at_run_step"] and event["new_size"] == new_size


def test_slope_trigger_grows_llama(tmp_path, data_cache):
    from staged_fast import distributed as D
    from staged_fast.trainer import Trainer

    args = parse_args([*START, "--seqlen", "32", "--batch_size", "2", "--train_steps", "50", "--grow_when", "slope",
                       "--grow_ops", "width", "--save_prefix", str(tmp_path / "run"), "--cache_dir", data_cache,
                       "--device", "cpu", "--no_progress"])
    trainer = Trainer(args, D.DistInfo())
    for step in range(10, 2000, 10):
        trainer.step = step
        trainer.on_validation(10.0 * step ** -0.5 + 3.0)
        if trainer.growths.fired:
            break
    assert trainer.growths.fired
    trainer.maybe_grow()
    assert trainer.config.shape_str() == "2L/128d/4H/2KV/384F" and trainer.growth_log[-1]["op"] == "width"
    assert trainer.schedule.base_lr == pytest.approx(initial_lr_for(trainer.config))
    trainer.close()


def test_evaluate_accepts_a_llama_checkpoint(tmp_path, capsys):
    from staged_fast.checkpoint import save_checkpoint
    from staged_fast.evaluate.__main__ import main
    from staged_fast.evaluate.common import run_cli
    from staged_fast.model import GPT

    torch.manual_seed(0)
    cfg = preset_config("llama_tiny_div2_width", vocab_size=50257, n_positions=64, dropout=0.0, attn_dropout=0.0)
    ckpt = save_checkpoint(tmp_path / "run", step=1, model=GPT(cfg), config=cfg)
    out = tmp_path / "w.json"
    assert run_cli(main, ["wikitext", "--checkpoint", str(ckpt), "--data_file", str(FIXTURES / "wikitext_tiny.raw"),
                          "--context", "32", "--no_progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"]["arch"] == "llama" and math.isfinite(result["ppl"])


def test_staged_vs_direct_counts_llama_flops_exactly():
    from benchmarks import staged_vs_direct as svd
    from staged_fast.model import GPT

    for name in ("llama_tiny", "llama_tiny_div2_width", "llama_small"):
        cfg = preset_config(name, vocab_size=64, n_positions=16)
        L, d, n = svd.parse_shape_preset(name)
        assert svd.parse_shape(cfg.shape_str()) == (L, d, n)
        norms = (2 * cfg.n_layer + 1) * cfg.n_embd
        assert n == GPT(cfg).num_params() - norms  # every matmul weight, nothing else
    assert svd.parse_shape("2L/64d/1H") == (2, 64)  # GPT-2 shapes unchanged
