"""Training losses: cross-entropy, IAST's region-guided self-training loss (reference §2),
HIAST's teacher-student consistency (reference §4) and the LSGAN losses of the output-space adversarial warm-up (reference §5).

Every mean is taken over the whole batch (all images' pixels pooled), as in the released
code, and an empty region contributes 0 instead of the released code's 0/0 = NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.labels import IGNORE_INDEX

# Domain labels of the released IAST code (AdaptSegNet's convention).
SOURCE_DOMAIN = 0.0
TARGET_DOMAIN = 1.0


@dataclass(frozen=True)
class RegionGuidedLoss:
    """The self-training loss and its parts; ``confident`` and ``ignored`` are unweighted."""

    total: Tensor
    seg: Tensor
    confident: Tensor
    ignored: Tensor


def _check_logits_and_label(logits: Tensor, label: Tensor, ignore_index: int) -> Tensor:
    if logits.dim() != 4 or label.dim() != 3 or logits.shape[:1] + logits.shape[2:] != label.shape:
        raise ValueError(
            f"logits of shape (N, K, H, W) and labels of shape (N, H, W) must agree, got "
            f"{tuple(logits.shape)} and {tuple(label.shape)}; upsample the logits to the label size"
        )
    if label.dtype.is_floating_point or label.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {label.dtype}")
    label = label.long()
    num_classes = logits.shape[1]
    invalid = ((label < 0) | (label >= num_classes)) & (label != ignore_index)
    if invalid.any():
        raise ValueError(
            f"labels hold values outside 0..{num_classes - 1} other than the ignore index "
            f"{ignore_index}: {torch.unique(label[invalid]).tolist()[:10]}"
        )
    return label


def _at_least_fp32(logits: Tensor) -> Tensor:
    # Half-precision log-probabilities lose too much precision (autocast runs these ops in fp32).
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def cross_entropy(logits: Tensor, label: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy over the labelled pixels of the batch; 0 when none is labelled.

    Equals ``F.cross_entropy(logits, label, ignore_index=ignore_index)`` whenever at least
    one pixel is labelled (that one returns NaN for an all-ignored batch).
    """
    label = _check_logits_and_label(logits, label, ignore_index)
    labelled = (label != ignore_index).sum()
    summed = F.cross_entropy(_at_least_fp32(logits), label, ignore_index=ignore_index, reduction="sum")
    return summed / labelled.clamp(min=1)


def region_guided_loss(
    logits: Tensor,
    pseudo_label: Tensor,
    ignore_index: int = IGNORE_INDEX,
    weight_confident: float = 0.1,
    weight_ignored: float = 3.0,
) -> RegionGuidedLoss:
    """IAST's self-training loss L = L_seg + weight_confident·R_c + weight_ignored·R_i.

    logits (N, K, H, W) at the label size; pseudo_label (N, H, W), ``ignore_index`` where
    no pseudo-label was kept. With p = softmax(logits), C the labelled pixels and I the
    ignored pixels of the whole batch:

    - L_seg = (1/|C|) Σ_{i∈C} -log p_{i,y_i}
    - R_c = (1/(K·|C|)) Σ_{i∈C} Σ_k -(1/K)·log p_ik   (smoothing towards uniform)
    - R_i = (1/(K·|I|)) Σ_{i∈I} Σ_k -p_ik·log p_ik    (sharpening: entropy / K)

    i.e. means over region × classes, the released code's ``sum / (K·|region|)``, whose
    values these match exactly when both regions are non-empty. An empty region's terms
    are 0 (its count is clamped to 1 under an empty sum), so neither value nor gradient
    is ever NaN.
    """
    pseudo_label = _check_logits_and_label(logits, pseudo_label, ignore_index)
    num_classes = logits.shape[1]
    log_p = F.log_softmax(_at_least_fp32(logits), dim=1)
    confident = pseudo_label != ignore_index
    n_confident = confident.sum().clamp(min=1)
    n_ignored = (~confident).sum().clamp(min=1)

    seg = F.nll_loss(log_p, pseudo_label, ignore_index=ignore_index, reduction="sum") / n_confident
    neg_log_p_sum = -log_p.sum(dim=1)
    confident_reg = (neg_log_p_sum * confident).sum() / (num_classes * num_classes * n_confident)
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    ignored_reg = (entropy * ~confident).sum() / (num_classes * n_ignored)

    total = seg + weight_confident * confident_reg + weight_ignored * ignored_reg
    return RegionGuidedLoss(total=total, seg=seg, confident=confident_reg, ignored=ignored_reg)


def consistency_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    pseudo_label: Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """HIAST's L_cst: soft cross-entropy from the teacher's softmax on the weak view to the
    student's on the strong view, over the pixels without a pseudo-label only:

        L_cst = (1/|I|) Σ_{i∈I} Σ_k -q_ik·log p_ik,   q = teacher probabilities (no gradient)

    0 (with zero gradient) when every pixel of the batch is labelled.
    """
    pseudo_label = _check_logits_and_label(student_logits, pseudo_label, ignore_index)
    if teacher_probs.shape != student_logits.shape:
        raise ValueError(
            f"teacher probabilities {tuple(teacher_probs.shape)} and student logits "
            f"{tuple(student_logits.shape)} must have the same shape"
        )
    ignored = pseudo_label == ignore_index
    log_p = F.log_softmax(_at_least_fp32(student_logits), dim=1)
    soft_ce = -(teacher_probs.detach().float() * log_p).sum(dim=1)
    return (soft_ce * ignored).sum() / ignored.sum().clamp(min=1)


def discriminator_loss(d_source: Tensor, d_target: Tensor) -> Tensor:
    """LSGAN loss of the discriminator: source maps → 0, target maps → 1, averaged.

    The inputs are the discriminator's outputs on *detached* softmax maps, so this loss
    trains the discriminator only.
    """
    source = F.mse_loss(d_source, torch.full_like(d_source, SOURCE_DOMAIN))
    target = F.mse_loss(d_target, torch.full_like(d_target, TARGET_DOMAIN))
    return (source + target) / 2


def adversarial_loss(d_target: Tensor) -> Tensor:
    """LSGAN loss of the segmentation network: make target maps look like source (→ 0).

    Unweighted; the warm-up adds it to the source cross-entropy times 0.05 (GTA5) or
    0.001 (SYNTHIA), as the released configs do.
    """
    return F.mse_loss(d_target, torch.full_like(d_target, SOURCE_DOMAIN))
