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
    with pytest.raises(ValueError, match="linear' or 'cosine"):
        LRSchedule(base_lr=1.0, warmup_steps=0, train_steps=10, decay="step")
