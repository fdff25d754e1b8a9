"""IAST's self-training round, and HIAST's on top of it.

IAST (reference §2): the student trains on the target images and a label store of IAS's
pseudo-labels, with the region-guided loss (cross-entropy on the labelled pixels, and
regularisation of the confident and ignored regions).

HIAST (reference §4) adds an EMA teacher, a fresh copy of the round's initial weights:
the student learns on strong views, the teacher predicts on the weak views, and its soft
predictions supervise the pixels without a pseudo-label (L_cst); with ``hard_classes``
every sample first receives the pseudo-labelled pixels of the hardest classes from a
donor image of the store (hard-aware augmentation; IAST's rounds can use it too).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline import distributed, selectors
from pipeline.data import streams
from pipeline.data.transforms import HardClassPaste, hard_class_donors
from pipeline.label_store import LabelStore
from pipeline.labels import IGNORE_INDEX
from pipeline.losses import consistency_loss, region_guided_loss
from pipeline.methods.base import Method
from pipeline.methods.teacher import make_teacher, update_teacher


class IAST(Method):
    needs = ("label_store",)
    two_views = False  # (weak, strong, label) batches instead of (image, label)

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        if cfg.hard_classes and LabelStore(cfg.label_store).manifest().get("statistics", {}).get("confidence") is None:
            raise ValueError(
                f"label store {cfg.label_store} holds no per-class confidence (it predates hard-class "
                "pasting): regenerate it with jobs/pseudo_label.py, or set hard_classes to 0"
            )

    def streams(self, start):
        cfg = self.cfg
        pseudo = streams.pseudo_labelled(cfg.label_store)
        paste = [hard_class_paste(cfg.label_store, pseudo[0], cfg.hard_classes)] if cfg.hard_classes else []
        return {"main": streams.batches(pseudo, cfg.target_crop_heights, cfg, start, 0, two_views=self.two_views,
                                        first=paste, sharded=True)}

    def region_guided(self, logits, label):
        parts = region_guided_loss(logits, label, IGNORE_INDEX, self.cfg.confident_weight, self.cfg.ignored_weight)
        return parts.total, {"seg": parts.seg, "confident_reg": parts.confident, "ignored_reg": parts.ignored}

    def step(self, batch, ctx):
        x, y = batch["main"]
        with ctx.autocast():
            loss, terms = self.region_guided(self.model(x), y)
        ctx.backward(loss)
        return {**terms, "loss": loss}


def hard_class_paste(store_uri: str, load, num_hard: int) -> HardClassPaste:
    """HIAST's pasting over a label store: its hardest classes and their donor images,
    from this worker's shard (``load`` loads its rows)."""
    store = LabelStore(store_uri)
    hard, probs = selectors.hard_classes(store.manifest()["statistics"]["confidence"], num_hard)
    rows = store.read_labels(columns=["class_kept"], rows=streams.shard(store))
    kept = np.array(rows.column("class_kept").to_pylist(), np.int64)
    paste = HardClassPaste(hard, probs, hard_class_donors(kept, hard), load)
    if not len(paste.classes) and distributed.rank() == 0:
        print(f"warning: label store {store_uri} keeps no pixel to paste; training without hard-class pasting",
              flush=True)
    return paste


class HIAST(IAST):
    two_views = True

    def __init__(self, cfg, student, device):
        super().__init__(cfg, student, device)
        self.teacher = make_teacher(student).to(device)

    def modules(self):
        return {"teacher": (self.teacher, None)}

    def step(self, batch, ctx):
        weak, strong, y = batch["main"]
        with ctx.autocast():
            logits = self.model(strong)
            loss, terms = self.region_guided(logits, y)
            with torch.no_grad():
                teacher_probs = self.teacher(weak).float().softmax(1)
            consistency = consistency_loss(logits, teacher_probs, y)
            loss = loss + self.cfg.consistency_weight * consistency
        ctx.backward(loss)
        return {**terms, "consistency": consistency, "loss": loss}

    def after_step(self, step):
        update_teacher(self.teacher, self.student, self.cfg.teacher_momentum)
