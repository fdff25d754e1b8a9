"""STvM: source-free self-training against a mean teacher, each pixel's loss weighted by
a reliability learnt online with proxy-based metric learning (reference §10).

The stage sees the source model's weights and unlabelled target images only. Per step:

1. the teacher (an EMA of the student, eval mode) predicts on the weak view: labels ŷ,
   and its backbone's features;
2. a metric network (a 1x1-conv MLP, one learnable proxy per class) embeds those
   features; it is trained at the same time, on its own optimiser, with a proxy loss whose
   labels are the teacher's (Proxy-Anchor by default);
3. a pixel's reliability is how surely the metric space puts its embedding with the
   proxy of its teacher label: softmax_k(s · cos(e, p_k)) at k = ŷ, in [0, 1];
4. MOCM: every image of the batch receives the pixels of half the classes of the next
   image's teacher labels (ClassMix), the classes chosen by their mean reliability;
5. the student learns, on the mixed strong views, from all the teacher's predictions with
   no threshold (its softmax, mixed as ClassMix mixes it; ``targets: hard`` its argmax):
   cross-entropy weighted per pixel by the reliability (a pixel of reliability 0 gives no
   gradient).

The paper's full text is not public: docs/methods.md gives each choice made here and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import distributed
from pipeline.data import streams
from pipeline.labels import CLASS_NAMES, IGNORE_INDEX
from pipeline.methods.base import Method, uses_amp
from pipeline.methods.teacher import make_teacher, update_teacher


@dataclass
class STvMConfig:
    teacher_momentum: float = 0.999  # EMA per step
    momentum_warmup: bool = False  # Mean Teacher's ramp: min(1 - 1/(step + 1), teacher_momentum)
    embedding_dim: int = 64
    hidden_dim: int = 256
    proxy_loss: Literal["proxy_anchor", "proxy_nca"] = "proxy_anchor"
    proxy_margin: float = 0.1  # Proxy-Anchor's δ
    proxy_scale: float = 32.0  # Proxy-Anchor's α, Proxy-NCA's softmax scale
    reliability_scale: float = 32.0  # s in softmax_k(s · cos(e, p_k))
    metric_lr: float = 1e-3  # Adam, metric network and proxies
    metric_pixels: int = 8192  # feature pixels per step and worker the proxy loss samples
    # MOCM's class choice: "weighted" draws half the classes with probability ∝ their mean
    # reliability, "reliable" takes the most reliable half, "random" ClassMix's; none: no mixing
    mix: Literal["weighted", "reliable", "random", "none"] = "weighted"
    targets: Literal["soft", "hard"] = "soft"  # the teacher's softmax (as ClassMix pastes it) or its argmax

    def __post_init__(self):
        if not 0 <= self.teacher_momentum < 1:
            raise ValueError(f"stvm.teacher_momentum must be in [0, 1), got {self.teacher_momentum}")
        for key in ("embedding_dim", "hidden_dim", "metric_pixels"):
            if getattr(self, key) < 1:
                raise ValueError(f"stvm.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("proxy_scale", "reliability_scale", "metric_lr"):
            if getattr(self, key) <= 0:
                raise ValueError(f"stvm.{key} must be > 0, got {getattr(self, key)}")
        if self.proxy_margin < 0:
            raise ValueError(f"stvm.proxy_margin must be >= 0, got {self.proxy_margin}")


class MetricNetwork(nn.Module):
    """Teacher features -> L2-normalised embeddings; one learnable proxy per class."""

    def __init__(self, in_channels: int, num_classes: int, hidden_dim: int = 256, embedding_dim: int = 64):
        super().__init__()
        # No batch norm: its statistics would drift apart on the DDP replicas, which this
        # module (trained on its own optimiser, gradients averaged by hand) must not.
        self.embed = nn.Sequential(
            nn.Conv2d(in_channels, hidden_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, embedding_dim, 1)
        )
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")  # as Proxy-Anchor's authors

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(features), dim=1)

    def cosines(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[N, D, h, w] (or [P, D]) embeddings -> cosine to each proxy, [N, K, h, w] (or [P, K])."""
        proxies = F.normalize(self.proxies, dim=1)
        if embeddings.dim() == 2:
            return embeddings @ proxies.t()
        return torch.einsum("ndhw,kd->nkhw", embeddings, proxies)


def proxy_anchor_loss(cos: torch.Tensor, labels: torch.Tensor, margin: float = 0.1, scale: float = 32.0) -> torch.Tensor:
    """Proxy-Anchor (Kim et al., CVPR 2020) over [P, K] cosines and [P] labels:

        1/|K+| Σ_{k∈K+} log(1 + Σ_{x: y=k} e^{-α(s(x,k) - δ)}) + 1/K Σ_k log(1 + Σ_{x: y≠k} e^{α(s(x,k) + δ)})

    K+: the classes with at least one sample."""
    positive = F.one_hot(labels, cos.shape[1]).bool()
    neg_inf = torch.tensor(float("-inf"), device=cos.device, dtype=cos.dtype)
    pos_term = torch.logsumexp(torch.where(positive, -scale * (cos - margin), neg_inf), dim=0)
    neg_term = torch.logsumexp(torch.where(~positive, scale * (cos + margin), neg_inf), dim=0)
    has_positive = positive.any(0)
    zero = torch.zeros((), device=cos.device, dtype=cos.dtype)
    pos = F.softplus(pos_term)[has_positive].sum() / has_positive.sum().clamp(min=1)  # log(1 + e^lse)
    neg = torch.where(torch.isfinite(neg_term), F.softplus(neg_term), zero).sum() / cos.shape[1]
    return pos + neg


def proxy_nca_loss(cos: torch.Tensor, labels: torch.Tensor, scale: float = 32.0) -> torch.Tensor:
    """Proxy-NCA with a softmax over all proxies: cross-entropy of scale·cos."""
    return F.cross_entropy(scale * cos, labels)


def reliability(cos: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax_k(scale · cos) at each pixel's label: [N, K, H, W] cosines, [N, H, W] labels -> [N, H, W]."""
    return torch.softmax(scale * cos.float(), dim=1).gather(1, labels[:, None]).squeeze(1)


def reliability_weighted_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean over pixels of w · CE(logits, target): every pixel learns from its teacher's
    prediction, as much as it is reliable (w = 0: no gradient). ``targets``: [N, H, W]
    labels, or [N, K, H, W] probabilities (soft cross-entropy)."""
    if targets.dim() == 3:
        ce = F.cross_entropy(logits.float(), targets, reduction="none")
    else:
        ce = -(targets.detach().float() * F.log_softmax(logits.float(), dim=1)).sum(1)
    return (weights.detach() * ce).mean()


def classmix_mask(labels: torch.Tensor, weights: torch.Tensor, rule: str,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """[H, W] boolean mask of the pixels to paste from one image: those of half its classes
    (at least one), drawn with probability ∝ their mean weight (``rule`` "weighted"), the
    most reliable ones ("reliable": highest mean weight) or random ones ("random", ClassMix's)."""
    classes = torch.unique(labels)
    if rule == "none" or not len(classes):
        return torch.zeros_like(labels, dtype=torch.bool)
    k = max(1, len(classes) // 2)
    if rule in ("reliable", "weighted"):
        means = torch.stack([weights[labels == c].mean() for c in classes]).float()
        if rule == "reliable":
            order = torch.argsort(means, descending=True, stable=True)
        else:
            order = torch.multinomial(means.cpu().clamp(min=1e-6), len(classes), generator=generator).to(means.device)
        chosen = classes[order[:k]]
    elif rule == "random":
        chosen = classes[torch.randperm(len(classes), generator=generator, device="cpu")[:k].to(classes.device)]
    else:
        raise ValueError(f"unknown mix rule {rule!r}: weighted, reliable, random or none")
    return torch.isin(labels, chosen)


class STvM(Method):
    needs = ("init", "target")

    def __init__(self, cfg, student, device):
        super().__init__(cfg, student, device)
        s = self.settings = cfg.stvm
        self.teacher = make_teacher(student).to(device)
        self.metric = MetricNetwork(student.backbone.out_channels, cfg.num_classes, s.hidden_dim,
                                    s.embedding_dim).to(device)
        self.m_optimizer = torch.optim.Adam(self.metric.parameters(), lr=s.metric_lr)
        self.m_scaler = torch.amp.GradScaler("cuda", enabled=uses_amp(cfg))
        # Teacher-label statistics against the target's true labels, where the split has
        # them (the benchmark): per class, [labelled, right, Σ reliability, Σ reliability when right].
        self.counts = torch.zeros(4, cfg.num_classes, dtype=torch.float64, device=device)
        self.reliability_sum = torch.zeros(2, dtype=torch.float64, device=device)  # [Σ r, pixels]

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        if cfg.label_store is not None:
            raise ValueError(f"stage stvm is source-free and learns from its teacher: label_store must be empty, "
                             f"got {cfg.label_store}")
        if cfg.source is not None:
            raise ValueError("stage stvm is source-free: `source` must be empty (it would never be read)")

    def modules(self):
        return {"teacher": (self.teacher, None), "metric": (self.metric, self.m_optimizer)}

    def streams(self, start):
        samples = self.cfg.target.samples()
        return {"main": streams.batches(streams.labels_if_present(samples), self.cfg.target_crop_heights, self.cfg,
                                        start, 0, two_views=True)}

    def _generator(self, step: int) -> torch.Generator:
        # a function of (seed, step, rank): a resumed stage draws what it would have drawn
        g = torch.Generator(device="cpu")
        g.manual_seed((self.cfg.seed * 1_000_003 + step) * 1009 + distributed.rank())
        return g

    def step(self, batch, ctx):
        s = self.settings
        weak, strong, truth = batch["main"]
        generator = self._generator(ctx.step)
        with torch.no_grad(), ctx.autocast():
            features, teacher_logits = self.teacher.forward_with_features(weak)
        features = features.float()
        labels = teacher_logits.max(1).indices  # [N, H, W] (argmax over dim 1 is 3x slower on CPU)
        small = F.interpolate(labels[:, None].float(), size=features.shape[-2:], mode="nearest")[:, 0].long()

        # the metric network learns on the teacher's features and labels
        with ctx.autocast():
            embeddings = self.metric(features)
        flat = embeddings.float().permute(0, 2, 3, 1).reshape(-1, embeddings.shape[1])
        flat_labels = small.reshape(-1)
        if len(flat) > s.metric_pixels:
            pick = torch.randperm(len(flat), generator=generator)[: s.metric_pixels].to(flat.device)
            flat, flat_labels = flat[pick], flat_labels[pick]
        cos = self.metric.cosines(flat)
        if s.proxy_loss == "proxy_anchor":
            metric_loss = proxy_anchor_loss(cos, flat_labels, s.proxy_margin, s.proxy_scale)
        else:
            metric_loss = proxy_nca_loss(cos, flat_labels, s.proxy_scale)
        self.m_optimizer.zero_grad(set_to_none=True)
        self.m_scaler.scale(metric_loss).backward()
        distributed.average_gradients(self.metric)  # not DDP-wrapped: replicas kept equal by hand
        self.m_scaler.step(self.m_optimizer)
        self.m_scaler.update()

        # each pixel's reliability, at the input size
        with torch.no_grad():
            cosines = self.metric.cosines(embeddings.detach().float())
            cosines = F.interpolate(cosines, size=labels.shape[-2:], mode="bilinear", align_corners=True)
            weights = reliability(cosines, labels, s.reliability_scale)
            self._count(labels, weights, truth)

            # MOCM: image i receives pixels of the next image's most reliable classes
            targets = teacher_logits.float().softmax(1) if s.targets == "soft" else labels
            x, y, w = strong, targets, weights
            mixed = torch.zeros_like(labels, dtype=torch.bool)
            if s.mix != "none" and len(strong) > 1:
                donor = torch.roll(torch.arange(len(strong), device=strong.device), -1)
                mixed = torch.stack([classmix_mask(labels[j], weights[j], s.mix, generator) for j in donor.tolist()])
                x = torch.where(mixed[:, None], strong[donor], strong)
                y = torch.where(mixed[:, None] if y.dim() == 4 else mixed, y[donor], y)
                w = torch.where(mixed, weights[donor], weights)

        with ctx.autocast():
            loss = reliability_weighted_loss(self.model(x), y, w)
        ctx.backward(loss)
        return {"seg": loss, "loss": loss, "metric_loss": metric_loss.detach(), "reliability": weights.mean(),
                "mixed_share": mixed.float().mean()}

    @torch.no_grad()
    def _count(self, labels, weights, truth):
        self.reliability_sum += torch.stack([weights.double().sum(), weights.new_tensor(weights.numel()).double()])
        valid = truth != IGNORE_INDEX
        if not valid.any():
            return
        k = self.cfg.num_classes
        y, r = labels[valid], weights[valid].double()
        right = (y == truth[valid]).double()
        self.counts[0] += torch.bincount(y, minlength=k).double()
        self.counts[1] += torch.bincount(y, weights=right, minlength=k)
        self.counts[2] += torch.bincount(y, weights=r, minlength=k)
        self.counts[3] += torch.bincount(y, weights=r * right, minlength=k)

    def after_step(self, step):
        m = self.settings.teacher_momentum
        if self.settings.momentum_warmup:
            m = min(1 - 1 / (step + 1), m)
        update_teacher(self.teacher, self.student, m)

    def summary(self):
        """The mean reliability over the stage, and the precision of the teacher's labels,
        unweighted and weighted by reliability, overall and per class (``stvm/...``), where
        the target split has labels."""
        n, right, r, r_right = distributed.sum_array(self.counts.cpu().numpy(), self.device)
        total, pixels = distributed.sum_array(self.reliability_sum.cpu().numpy(), self.device)
        metrics = {"stvm/reliability": float(total / max(pixels, 1))}  # mean over the stage
        if n.sum() == 0:
            return metrics
        names = CLASS_NAMES if self.cfg.num_classes == len(CLASS_NAMES) else [str(c) for c in range(len(n))]
        metrics.update({"stvm/teacher_precision": float(right.sum() / n.sum()),
                        "stvm/teacher_precision_weighted": float(r_right.sum() / max(r.sum(), 1e-12))})
        for c, name in enumerate(names):
            if n[c] > 0:
                metrics[f"stvm/teacher_precision/{name}"] = float(right[c] / n[c])
                metrics[f"stvm/teacher_precision_weighted/{name}"] = float(r_right[c] / max(r[c], 1e-12))
        return metrics
