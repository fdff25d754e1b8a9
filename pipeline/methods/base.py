"""What a training method is, apart from the loop that runs it (pipeline.train).

The loop owns what every method shares: device and DDP, mixed precision, the student's
optimiser and learning-rate schedule, checkpoint and resume, logging and validation. A
method declares the rest: the data it reads, the modules it trains or keeps beside the
student (checkpointed with it), and one training step that returns its loss terms.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import ClassVar, Iterator

import torch
from torch import nn

Modules = dict[str, tuple[nn.Module, torch.optim.Optimizer | None]]


def uses_amp(cfg) -> bool:
    return bool(cfg.amp and cfg.use_gpu)


class StepContext:
    """What a step needs from the loop: autocast, the student's scaled backward, and the
    step's number (1-based; for random draws that a resumed run repeats)."""

    def __init__(self, use_amp: bool):
        self.use_amp = use_amp
        self.step = 0
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    def autocast(self) -> AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()


class Method:
    """One training method over the shared loop.

    ``student`` is the model the stage trains and saves (not yet wrapped in DDP): a method
    builds its other modules from it in ``__init__``. The loop then sets ``self.model``,
    the student as the step must call it (DDP-wrapped when distributed), restores every
    module of ``modules()`` on resume, and calls ``streams`` once and ``step`` / ``after_step``
    once per iteration.
    """

    #: TrainConfig keys that must be set for this method (checked before any worker starts)
    needs: ClassVar[tuple[str, ...]] = ()
    #: of those, the data splits that must carry labels
    labelled: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg, student: nn.Module, device: torch.device):
        self.cfg, self.student, self.device = cfg, student, device
        self.model: nn.Module = student

    @classmethod
    def check(cls, cfg) -> None:
        """Static checks of the stage's settings, on the driver; raise ValueError naming the key."""
        for key in cls.needs:
            if getattr(cfg, key) is None:
                raise ValueError(f"stage {cfg.stage} needs `{key}` in its config")

    def modules(self) -> Modules:
        """name -> (module, its optimiser or None): checkpointed and restored with the student."""
        return {}

    def scalers(self) -> dict[str, torch.amp.GradScaler]:
        """name -> the GradScaler of a module the method steps itself (the student's is the
        loop's): checkpointed and restored with it."""
        return {}

    def streams(self, start: int) -> dict[str, Iterator]:
        """name -> this worker's batch iterator from step ``start`` on."""
        raise NotImplementedError

    def step(self, batch: dict[str, list[torch.Tensor]], ctx: StepContext) -> dict[str, torch.Tensor]:
        """One step's forward and backward (``ctx.backward`` for the student's loss; the loop
        then steps the student's optimiser). Returns the loss terms, ``loss`` the student's
        whole objective; each is logged as ``train/<name>``."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """After the student's optimiser step (e.g. a teacher's EMA update)."""

    def summary(self) -> dict[str, float]:
        """Metrics of the whole stage, added to its final report; runs on every worker (it
        may use collectives)."""
        return {}
