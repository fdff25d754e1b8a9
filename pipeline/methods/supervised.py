"""Supervised training: source-only on the labelled source set, the oracle on the labelled
target set (the benchmark's upper bound)."""

from __future__ import annotations

from pipeline.data import streams
from pipeline.losses import cross_entropy
from pipeline.methods.base import Method


class Supervised(Method):
    split: str  # the TrainConfig key of the labelled data

    def crop_heights(self):
        return self.cfg.source_crop_heights if self.split == "source" else self.cfg.target_crop_heights

    def streams(self, start):
        samples = getattr(self.cfg, self.split).samples()
        return {"main": streams.batches(streams.labelled(samples), self.crop_heights(), self.cfg, start, 0)}

    def step(self, batch, ctx):
        x, y = batch["main"]
        with ctx.autocast():
            loss = cross_entropy(self.model(x), y)
        ctx.backward(loss)
        return {"seg": loss, "loss": loss}


class SourceOnly(Supervised):
    split = "source"
    needs = labelled = ("source",)


class Oracle(Supervised):
    split = "target"
    needs = labelled = ("target",)
