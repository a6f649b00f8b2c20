import math

import pytest

from staged_fast.lr_schedule import LRSchedule


def test_linear_warmup_then_linear_decay_to_zero():
    s = LRSchedule(base_lr=1.0, warmup_steps=10, train_steps=110)
    assert s(0) == pytest.approx(0.1)
    assert s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5)
    assert s(110) == 0.0 and s(500) == 0.0


def test_cosine_decay():
    s = LRSchedule(base_lr=2.0, warmup_steps=0, train_steps=100, decay="cosine", min_lr=0.2)
    assert s(0) == pytest.approx(2.0)
    assert s(50) == pytest.approx(0.2 + 0.9 * (1 + math.cos(math.pi / 2)))
    assert s(100) == pytest.approx(0.2)


def test_restart_ramp_from_zero_to_schedule():
    s = LRSchedule(base_lr=1.0, warmup_steps=10, train_steps=1010)
    s.restart(300, 50)
    assert s(300) == 0.0
    assert s(325) == pytest.approx(0.5 * s.base(350))
    assert s(350) == pytest.approx(s.base(350))
    assert s(600) == pytest.approx(s.base(600))
    assert s(299) == pytest.approx(s.base(299))


def test_state_roundtrip():
    s = LRSchedule(base_lr=3e-4, warmup_steps=5, train_steps=50, decay="cosine")
    s.restart(20, 3)
    t = LRSchedule.from_state_dict(s.state_dict())
    assert all(s(i) == t(i) for i in range(60))


def test_bad_decay():
    with pytest.raises(ValueError, match="one of linear, cosine, wsd"):
        LRSchedule(base_lr=1.0, warmup_steps=0, train_steps=10, decay="step")
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="--decay_fraction must be in"):
            LRSchedule(base_lr=1.0, warmup_steps=0, train_steps=10, decay="wsd", decay_fraction=fraction)


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fraction():
    s = LRSchedule(base_lr=2.0, warmup_steps=10, train_steps=110, decay="wsd", min_lr=0.2, decay_fraction=0.25)
    assert s(0) == pytest.approx(0.2) and s(9) == pytest.approx(2.0)  # the same warmup
    decay_start = 110 - round(0.25 * 110)  # 82
    assert all(s(i) == 2.0 for i in range(10, decay_start))
    assert s(decay_start) == pytest.approx(2.0)
    assert s(decay_start + 14) == pytest.approx(0.2 + 1.8 * (1 - 14 / 28))
    assert s(110) == pytest.approx(0.2) and s(400) == pytest.approx(0.2)
    steps = [s(i) for i in range(decay_start, 111)]
    assert all(a > b for a, b in zip(steps, steps[1:]))


def test_wsd_decay_longer_than_the_run_after_warmup_starts_at_warmup():
    s = LRSchedule(base_lr=1.0, warmup_steps=50, train_steps=100, decay="wsd", decay_fraction=1.0)
    assert s(50) == pytest.approx(1.0) and s(75) == pytest.approx(0.5) and s(100) == 0.0


def test_a_saved_schedule_without_decay_fraction_loads_with_its_default():
    state = LRSchedule(base_lr=1.0, warmup_steps=0, train_steps=10).state_dict()
    del state["decay_fraction"]  # checkpoints written before wsd
    assert LRSchedule.from_state_dict(state).decay_fraction == 0.2


def test_the_trainer_follows_wsd_and_refuses_a_bad_fraction(tmp_path, data_cache, capsys):
    from staged_fast.metrics import read_metrics
    from train_utils import train

    assert train(tmp_path / "run", data_cache, "--train_steps", "8", "--warmup_steps", "2", "--lr", "1e-3",
                 "--lr_decay", "wsd", "--decay_fraction", "0.5") == 0
    logged = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    want = LRSchedule(base_lr=1e-3, warmup_steps=2, train_steps=8, decay="wsd", decay_fraction=0.5)
    assert logged == pytest.approx([want(i) for i in range(8)])
    assert logged[2] == logged[3] == pytest.approx(1e-3) and logged[7] < logged[5] < 1e-3
    capsys.readouterr()
    assert train(tmp_path / "bad", data_cache, "--train_steps", "8", "--lr_decay", "wsd", "--decay_fraction", "0") == 2
    assert "--decay_fraction must be in (0, 1]" in capsys.readouterr().err
