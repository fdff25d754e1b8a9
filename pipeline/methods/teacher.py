"""Teachers that are a moving average of the student (HIAST, STvM)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pipeline import distributed


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of the student's current weights, in eval mode (its own BN statistics)."""
    teacher = copy.deepcopy(student).eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum·teacher + (1 - momentum)·student, for the weights and the
    BatchNorm statistics alike (the teacher runs in eval mode, on its own statistics);
    integer buffers (BN's batch counters) are copied."""
    taught = student.state_dict()
    for name, value in teacher.state_dict().items():
        if value.dtype.is_floating_point:
            value.mul_(momentum).add_(taught[name].detach(), alpha=1 - momentum)
        else:
            value.copy_(taught[name])


def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """The EMA step, then rank 0's batch-norm statistics on every replica: DDP keeps the
    students' weights equal, but each rank's running statistics follow its own batch, and
    a teacher averaging them would drift apart from one rank to the next."""
    ema_update(teacher, student, momentum)
    distributed.broadcast_buffers(teacher)
