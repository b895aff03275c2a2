import math

import pytest

from aftermath.errors import ConfigError
from aftermath.optim import LRSchedule


def test_constant_with_and_without_warmup():
    assert [LRSchedule(0.5).lr(s) for s in (0, 10, 10_000)] == [0.5, 0.5, 0.5]
    s = LRSchedule(1.0, warmup_steps=4)
    assert [s.lr(i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_warmup_decay_and_clamp():
    s = LRSchedule(1.0, kind="cosine", warmup_steps=10, total_steps=110, final_fraction=0.1)
    assert s.lr(0) == pytest.approx(0.1)
    assert s.lr(9) == pytest.approx(1.0)
    assert s.lr(10) == pytest.approx(1.0)
    assert s.lr(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr(110) == pytest.approx(0.1)
    assert s.lr(500) == pytest.approx(0.1)  # clamped, not climbing back
    values = [s.lr(i) for i in range(10, 200)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_schedule_errors():
    with pytest.raises(ConfigError):
        LRSchedule(1.0, kind="linear")
    with pytest.raises(ConfigError):
        LRSchedule(1.0, kind="cosine", warmup_steps=10, total_steps=10)
    with pytest.raises(ConfigError):
        LRSchedule(float("nan"))
