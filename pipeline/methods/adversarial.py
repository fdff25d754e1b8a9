"""Output-space adversarial warm-up (AdaptSegNet's, LSGAN), from a source-only model:
cross-entropy on source batches, and a discriminator over the softmax maps that the
student learns to fool on target batches."""

from __future__ import annotations

import torch

from pipeline import distributed
from pipeline.data import streams
from pipeline.losses import adversarial_loss, cross_entropy, discriminator_loss
from pipeline.methods.base import Method, uses_amp
from pipeline.models.discriminator import OutputSpaceDiscriminator
from pipeline.schedule import cosine_factor, group_floor


class Adversarial(Method):
    needs = ("source", "target")
    labelled = ("source",)

    def __init__(self, cfg, student, device):
        super().__init__(cfg, student, device)
        self.discriminator = OutputSpaceDiscriminator(cfg.num_classes).to(device)
        self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.discriminator_lr,
                                            betas=tuple(cfg.discriminator_betas))
        self.d_scaler = torch.amp.GradScaler("cuda", enabled=uses_amp(cfg))

    def modules(self):
        return {"discriminator": (self.discriminator, self.d_optimizer)}

    def scalers(self):
        return {"discriminator_scaler": self.d_scaler}

    def streams(self, start):
        cfg = self.cfg
        return {
            "main": streams.batches(streams.labelled(cfg.source.samples()), cfg.source_crop_heights, cfg, start, 0),
            "target": streams.batches(streams.unlabelled(cfg.target.samples()), cfg.target_crop_heights, cfg,
                                      start, 1),
        }

    def discriminator_lr(self, step: int) -> float:
        """The discriminator's lr at (1-based) ``step``: constant, or the student's cosine
        with the same period and floor (released IAST: eta_min 0.001 x the student's lr)."""
        cfg = self.cfg
        if cfg.discriminator_schedule == "constant":
            return cfg.discriminator_lr
        floor = group_floor(cfg.final_lr_ratio, cfg.discriminator_lr, cfg.lr, cfg.lr_floor_of)
        return cfg.discriminator_lr * cosine_factor(step - 1, cfg.iterations, cfg.cosine_period, floor)

    def step(self, batch, ctx):
        cfg, discriminator = self.cfg, self.discriminator
        for group in self.d_optimizer.param_groups:  # a function of the step: a resumed run repeats it
            group["lr"] = self.discriminator_lr(ctx.step)
        x, y = batch["main"]
        xt = batch["target"][0]
        # The second backward runs separately, as the released code does: the source
        # graph is freed first, which halves the peak activation memory. DDP all-reduces
        # the student's gradients once, after the second (no_sync on the first).
        with distributed.no_sync(self.model):
            with ctx.autocast():
                logits = self.model(x)
                seg = cross_entropy(logits, y)
            ctx.backward(seg)
        discriminator.requires_grad_(False)
        with ctx.autocast():
            target_logits = self.model(xt)
            adv = adversarial_loss(discriminator(target_logits.float().softmax(1)))
        ctx.backward(cfg.adversarial_weight * adv)
        discriminator.requires_grad_(True)
        self.d_optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            d_loss = discriminator_loss(
                discriminator(logits.detach().float().softmax(1)),
                discriminator(target_logits.detach().float().softmax(1)),
            )
        self.d_scaler.scale(d_loss).backward()
        distributed.average_gradients(discriminator)  # not DDP-wrapped (see average_gradients)
        self.d_scaler.step(self.d_optimizer)
        self.d_scaler.update()
        # train/loss: the generator's whole objective
        return {"seg": seg, "adversarial": adv, "discriminator": d_loss,
                "loss": seg + cfg.adversarial_weight * adv.detach()}
