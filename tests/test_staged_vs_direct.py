"""benchmarks/staged_vs_direct.py: the analysis on synthetic metrics, and one tiny end-to-end smoke run."""
from __future__ import annotations

import json
import math

import pytest

from benchmarks import staged_vs_direct as svd

V, T = 1000, 32


def _rec(it, val, shape=(2, 64), tokens_per_update=100, tps=1000.0):
    return dict(step=it, iteration=it, loss=val + 0.1, val_loss=val, lr=1e-3, tokens=it * tokens_per_update,
                tokens_per_s=tps, n_layer=shape[0], n_embd=shape[1])


def test_flops_per_token_formula():
    # 6 * (12 L d^2 + V d) + 12 L d T, by hand for L=2, d=64, V=1000, T=32
    assert svd.flops_per_token(2, 64, T, V) == 6 * (12 * 2 * 64 * 64 + 1000 * 64) + 12 * 2 * 64 * 32
    assert svd.parse_shape("2L/64d/1H") == (2, 64)
    with pytest.raises(ValueError):
        svd.parse_shape("64d")


def test_non_embedding_params_match_model():
    import torch
    from staged_fast.config import GPTConfig
    from staged_fast.model import GPT

    model = GPT(GPTConfig(n_layer=2, n_embd=64, n_head=1, vocab_size=V, n_positions=T))
    matmul = sum(p.numel() for n, p in model.named_parameters()
                 if p.dim() == 2 and "wte" not in n and "wpe" not in n)
    assert matmul == svd.non_embedding_params(2, 64)
    assert isinstance(torch.__version__, str)


def test_build_curve_integrates_over_growth():
    # growth after update 30 from 2L/64d to 2L/128d; records every 10 updates, val every 20
    recs = [_rec(it, 5.0 - it / 100, shape=(2, 64) if it <= 30 else (2, 128)) for it in range(10, 61, 10)]
    recs[-1]["tokens_per_s"] = 500.0
    ev = [dict(event="growth", op="width", iteration=30, step_before=30, step_after=17, loss_before=4.7,
               loss_after=4.7, old_size="2L/64d/1H", new_size="2L/128d/2H")]
    pts = svd.build_curve(recs, ev, seqlen=T, vocab_size=V, val_every=20)
    assert [p["iteration"] for p in pts] == [20, 40, 60]  # 10, 30, 50 carry stale val losses
    fs, ft = svd.flops_per_token(2, 64, T, V), svd.flops_per_token(2, 128, T, V)
    assert pts[0]["flops"] == pytest.approx(20 * 100 * fs)
    assert pts[1]["flops"] == pytest.approx(30 * 100 * fs + 10 * 100 * ft)
    assert pts[2]["flops"] == pytest.approx(30 * 100 * fs + 30 * 100 * ft)
    assert pts[2]["wall_s"] == pytest.approx(50 * 100 / 1000 + 10 * 100 / 500)
    assert pts[2]["wall_nominal_s"] == pytest.approx(60 * 100 / 1000)  # each shape's median throughput
    # a growth inside a log interval (after update 25) splits it
    ev2 = [dict(ev[0], iteration=25)]
    pts2 = svd.build_curve(recs, ev2, seqlen=T, vocab_size=V, val_every=20)
    assert pts2[1]["flops"] == pytest.approx(25 * 100 * fs + 15 * 100 * ft)
    # no growth: the shape comes from the records
    pts3 = svd.build_curve(recs[:2], [], seqlen=T, vocab_size=V)
    assert pts3[1]["flops"] == pytest.approx(20 * 100 * fs)


def test_crossing_interpolates_in_log_flops():
    pts = [dict(iteration=i, flops=f, wall_s=w, val_loss=l)
           for i, f, w, l in ((10, 1e9, 1.0, 5.0), (20, 1e10, 3.0, 4.0), (30, 1e11, 5.0, 3.0))]
    c = svd.crossing(pts, 3.5)  # halfway between points 2 and 3: 10^10.5 FLOPs
    assert c["flops"] == pytest.approx(10 ** 10.5) and c["wall_s"] == pytest.approx(4.0)
    assert c["iteration"] == pytest.approx(25) and c["interpolated"]
    assert svd.crossing(pts, 4.0)["flops"] == pytest.approx(1e10)  # exactly on a point
    assert svd.crossing(pts, 6.0)["flops"] == pytest.approx(1e9)  # reached at the first point
    assert svd.crossing(pts, 2.9) is None
    # the first crossing counts, even if the curve goes back up
    bumpy = pts[:2] + [dict(iteration=25, flops=3e10, wall_s=4.0, val_loss=4.2)] + pts[2:]
    assert svd.crossing(bumpy, 4.0)["iteration"] == 20


def _curve(fpt, losses, every=10, tpu=100):
    return [dict(iteration=every * (k + 1), step=every * (k + 1), flops=fpt * tpu * every * (k + 1),
                 wall_s=0.01 * every * (k + 1) * fpt / 1e6, wall_nominal_s=0.01 * every * (k + 1) * fpt / 1e6,
                 val_loss=l) for k, l in enumerate(losses)]


def test_compare_saving_and_reverse():
    direct = _curve(1e6, [5.0, 4.0, 3.5, 3.2, 3.0])
    staged = _curve(1e6, [5.0, 4.0, 3.5, 3.0, 2.9])  # reaches 3.0 at 40 updates instead of 50
    c = svd.compare(direct, staged)
    assert c["target_loss"] == 3.0 and c["reached"]
    assert c["flops_ratio"] == pytest.approx(0.8) and c["flops_saving"] == pytest.approx(0.2)
    assert c["wall_ratio"] == pytest.approx(0.8) and c["wall_nominal_ratio"] == pytest.approx(0.8)
    worse = _curve(1e6, [5.0, 4.2, 3.8, 3.5, 3.2])
    c2 = svd.compare(direct, worse)
    assert not c2["reached"] and "flops_ratio" not in c2
    r = c2["reverse"]  # direct reaches 3.2 at 40 updates, staged needed 50
    assert r["target_loss"] == 3.2 and r["flops_ratio"] == pytest.approx(50 / 40)


def test_compare_growth_constant_op():
    direct = _curve(1e6, [5.0, 4.0, 3.5, 3.2, 3.0])
    staged = _curve(5e5, [5.2, 4.5, 4.0, 3.4, 3.1])
    ev = [dict(event="growth", op="width", iteration=30, step_before=30, step_after=17, loss_before=4.0,
               loss_after=4.0, old_size="2L/64d/1H", new_size="2L/128d/2H")]
    g = svd.compare(direct, staged, ev)["growth"]
    # staged val loss at growth 4.0 = direct's at update 20: measured constant_op 30 / 20
    assert g["val_loss_at_growth"] == 4.0 and g["direct_iteration_at_equal_loss"] == pytest.approx(20)
    assert g["measured_constant_op"] == pytest.approx(1.5) and g["loss_jump"] == 0.0


def test_table_and_plot(tmp_path):
    direct = _curve(1e6, [5.0, 4.0, 3.5, 3.2, 3.0])
    staged = _curve(5e5, [5.2, 4.5, 3.6, 3.1, 2.95])
    ev = [dict(event="growth", op="width", iteration=20, step_before=20, step_after=11, loss_before=4.5,
               loss_after=4.5, old_size="2L/64d/1H", new_size="2L/128d/2H")]
    res = dict(config=dict(target="tiny", start="tiny_div2_width"), comparison=svd.compare(direct, staged, ev))
    text = svd.table(res)
    assert "FLOPs to L*" in text and "saved" in text and "measured constant_op" in text
    svd.plot(direct, staged, res, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    res["comparison"] = svd.compare(direct, _curve(1e6, [5.0, 4.5, 4.0, 3.8, 3.6]))
    assert "did NOT reach" in svd.table(res)


def test_plan_ends_at_direct_horizon(tmp_path):
    plan = svd.make_plan("tiny", 300, tmp_path / "plan.json")
    assert abs(plan["final_schedule_step"] - 300) <= 1
    assert plan["growths"][0]["op"] == "width" and plan["stages"][0]["n_embd"] == 64
    assert json.loads((tmp_path / "plan.json").read_text())["final_schedule_step"] == plan["final_schedule_step"]


@pytest.mark.slow
def test_end_to_end_smoke(tmp_path, data_cache):
    """Both runs for a few steps with the GPT-2 vocabulary: the pipeline runs and the growth (with the default
    symmetry-breaking split) preserves the loss."""
    out = tmp_path / "svd"
    rc = svd.main(["--quick", "--out", str(out), "--cache_dir", data_cache, "--vocab", "gpt2",
                   "--train_steps", "12", "--seqlen", "32", "--batch_size", "4", "--val_every", "4",
                   "--val_batches", "2", "--warmup_steps", "2", "--strategy", "fixed", "--grow_at", "8",
                   "--restart_warmup", "2"])
    assert rc == 0
    res = json.loads((out / "staged_vs_direct_staged_fixed_noise0.01.json").read_text())
    g = res["comparison"]["growth"]
    assert g["iteration"] == 8 and g["new_size"].startswith("2L/128d")
    assert math.isclose(g["loss_before"], g["loss_after"], rel_tol=0, abs_tol=1e-4)  # dropout 0: exact
    assert res["curves"]["staged"][-1]["flops"] > 0 and (out / "staged_vs_direct_staged_fixed_noise0.01.png").exists()
