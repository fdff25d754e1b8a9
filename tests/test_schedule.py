import math

import pytest

from pipeline.schedule import cosine_factor, group_floor
from pipeline.train import TrainConfig, _build


def _lrs_after(steps: int, **kw) -> dict[str, float]:
    cfg = TrainConfig(stage="source_only", name="x", storage="/tmp/unused", arch="deeplabv2_small", lr=3e-5, **kw)
    _, optimizer, scheduler = _build(cfg)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return {g["name"]: g["lr"] / g["initial_lr"] for g in optimizer.param_groups}


def test_a_released_round_ends_at_a_quarter_of_its_lr():
    # 2-epoch GTA5 round (6,234 steps) with T_MAX 3 epochs: the cosine's period is 1.5 rounds,
    # and the floor is 0.001 x the head's lr for every group (released eta_min = LR * 0.001).
    end = _lrs_after(6234, iterations=6234, cosine_period=1.5, lr_floor_of="head")
    assert end["classifier"] == pytest.approx(0.2509, abs=1e-3)
    assert end["backbone"] == pytest.approx(0.2576, abs=1e-3)  # at 0.1x the head's lr, same floor in absolute


def test_a_stage_with_period_one_anneals_to_its_floor():
    end = _lrs_after(50, iterations=50)
    assert end["classifier"] == pytest.approx(0.001) and end["backbone"] == pytest.approx(0.001)
    assert _lrs_after(50, iterations=50, lr_floor_of="head")["backbone"] == pytest.approx(0.01)


def test_the_mean_factor_over_a_released_round():
    mean = sum(cosine_factor(s, 6234, 1.5, 0.001) for s in range(6234)) / 6234
    assert mean == pytest.approx(0.707, abs=2e-3)  # about 41% more lr than annealing to the floor (0.50)
    assert sum(cosine_factor(s, 6234, 1.0, 0.001) for s in range(6234)) / 6234 == pytest.approx(0.5, abs=1e-3)


def test_the_factor_never_rises_again_within_a_stage():
    values = [cosine_factor(s, 100, 1.5, 0.001) for s in range(0, 120)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[-1] == values[100]  # held after the stage's last step


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="cosine_period must be >= 1"):
        TrainConfig(stage="source_only", name="x", storage="/tmp/u", iterations=5, lr=1e-4, cosine_period=0.5)
    with pytest.raises(ValueError, match="lr_floor_of"):
        group_floor(0.001, 1e-5, 1e-4, "backbone")
    assert math.isclose(group_floor(0.001, 1e-5, 1e-4, "head"), 0.01)
