"""The learning-rate schedule of every stage: a cosine from the base lr towards a floor.

The released IAST code (``CosineAnnealingLR_with_Restart``, stepped once per iteration)
anneals source-only and the warm-up over exactly the stage, but gives each 2-epoch round
a period of 3 epochs (``T_MAX: 3``): a round ends at 0.251x its lr, not at the floor.
No warm restart falls inside any stage, so one cosine per stage describes every one.
"""

from __future__ import annotations

import math


def cosine_factor(step: int, iterations: int, period: float = 1.0, floor: float = 0.001) -> float:
    """lr / base lr after ``step`` of ``iterations`` steps: a cosine from 1 down to
    ``floor`` over ``period`` x ``iterations`` steps (period 1: the floor at the end)."""
    progress = min(step, iterations) / (period * iterations)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def group_floor(final_lr_ratio: float, group_lr: float, head_lr: float, floor_of: str) -> float:
    """A parameter group's floor as a fraction of its own lr: ``final_lr_ratio`` of the
    group's own lr ("group"), or of the head's lr for every group ("head", the released
    ``eta_min = 0.001 * LR``: the backbone at 0.1x then ends at 0.01x its own lr)."""
    if floor_of == "group":
        return final_lr_ratio
    if floor_of == "head":
        return final_lr_ratio * head_lr / group_lr
    raise ValueError(f"lr_floor_of must be group or head, got {floor_of!r}")
