"""Evaluation: confusion-matrix mIoU and (multi-scale, flipped) inference (reference §7).

IoU follows cityscapesScripts' pixel-level evaluation exactly: intersections and
unions are summed over the whole set (not averaged per image); ground-truth pixels
labelled 255 are dropped, whatever was predicted there; a class with no ground-truth
pixel but some predicted pixels has IoU 0 and counts in the mean; a class absent
from both has IoU NaN and is left out of the mean.

Sizes in this module are (width, height), the way the papers write them (1280x640).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.data.transforms import normalize
from pipeline.labels import CITYSCAPES19, IGNORE_INDEX, NUM_CLASSES, LabelSpace, label_space

# IAST-MST: softmax at these sizes, upsampled to full resolution and summed.
MST_SIZES: tuple[tuple[int, int], ...] = ((1024, 512), (1280, 640), (1536, 768), (1800, 900), (2048, 1024))


class ConfusionMatrix:
    """Pixel counts ``matrix[target, prediction]`` over K classes, summed over images.

    ``matrix`` is a plain int64 array, so shards from many workers combine by summing
    (``a + b``, ``ConfusionMatrix.merge(parts)``, or an all-reduce of ``matrix``).
    ``space`` (a name or ``pipeline.labels.LabelSpace``) gives the class names and mIoU keys
    of ``summary``/``table``; by default Cityscapes-19 when there are 19 classes, else none.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, matrix: np.ndarray | None = None,
                 space: str | LabelSpace | None = None):
        if space is not None:
            space = label_space(space)
            if space.num_classes != num_classes:
                raise ValueError(f"label space {space.name} has {space.num_classes} classes, not {num_classes}")
        self.space = space or (CITYSCAPES19 if num_classes == CITYSCAPES19.num_classes else None)
        if matrix is None:
            matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        matrix = np.asarray(matrix)
        if matrix.shape != (num_classes, num_classes):
            raise ValueError(f"confusion matrix has shape {matrix.shape}, expected ({num_classes}, {num_classes})")
        self.num_classes = num_classes
        self.matrix = matrix.astype(np.int64)

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Count one prediction map (train ids 0..K-1) against its target (train ids or 255)."""
        pred, target = _as_numpy(pred), _as_numpy(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
        k = self.num_classes
        bad_target = f"target holds values outside 0..{k - 1} and {IGNORE_INDEX}: map labels to train ids first"
        if pred.size and (pred.min() < 0 or pred.max() >= k):
            raise ValueError(f"prediction holds values outside 0..{k - 1}: predictions must be class indices")
        if target.size and (target.min() < 0 or target.max() > IGNORE_INDEX):
            raise ValueError(bad_target)
        # Count every (target value, prediction) pair, rows 0..255, in one bincount (no
        # boolean masking: ~3x faster on 2048x1024); row 255 holds the ignored pixels.
        index = target.astype(np.int64) * k + pred
        counts = np.bincount(index.ravel(), minlength=(IGNORE_INDEX + 1) * k).reshape(IGNORE_INDEX + 1, k)
        if counts[k:IGNORE_INDEX].any():
            raise ValueError(bad_target)
        self.matrix += counts[:k]

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if self.num_classes != other.num_classes:
            raise ValueError(f"cannot add confusion matrices of {self.num_classes} and {other.num_classes} classes")
        return ConfusionMatrix(self.num_classes, self.matrix + other.matrix, self.space)

    @classmethod
    def merge(cls, parts: Iterable[ConfusionMatrix]) -> ConfusionMatrix:
        """Sum the matrices of several shards (e.g. one per Ray worker)."""
        parts = list(parts)
        if not parts:
            raise ValueError("merge needs at least one confusion matrix")
        total = ConfusionMatrix(parts[0].num_classes, space=parts[0].space)
        for part in parts:
            total = total + part
        return total

    def iou(self) -> np.ndarray:
        """Per-class IoU = TP / (TP + FP + FN); NaN where the class is in neither target nor prediction."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def mean_iou(self, classes: Sequence[int] | None = None) -> float:
        """Mean IoU over ``classes`` (all by default), skipping NaN like cityscapesScripts."""
        iou = self.iou() if classes is None else self.iou()[list(classes)]
        iou = iou[~np.isnan(iou)]
        return float(iou.mean()) if iou.size else float("nan")

    def pixel_accuracy(self) -> float:
        """Fraction of non-ignored pixels predicted correctly."""
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def summary(self) -> dict[str, float]:
        """Flat metrics (fractions in [0, 1]) for logging: ``IoU/<class>``, the space's
        mIoUs (Cityscapes-19: mIoU-19/16/13; NTHU: mIoU-13; RobotCar: mIoU-9), pixel accuracy."""
        names = self._names()
        metrics = {f"IoU/{name}": float(v) for name, v in zip(names, self.iou())}
        metrics.update({key: self.mean_iou(classes) for key, classes in self.space.miou.items()})
        metrics["pixel_accuracy"] = self.pixel_accuracy()
        return metrics

    def table(self) -> str:
        """Markdown table of per-class IoU and the space's mIoUs, in percent."""
        rows = list(zip(self._names(), self.iou()))
        rows += [(key, self.mean_iou(classes)) for key, classes in self.space.miou.items()]
        width = max(len(name) for name, _ in rows)
        lines = [f"| {'class':<{width}} | IoU (%) |", f"|{'-' * (width + 2)}|--------:|"]
        for name, value in rows:
            cell = "n/a" if np.isnan(value) else f"{100 * value:.2f}"
            lines.append(f"| {name:<{width}} | {cell:>7} |")
        return "\n".join(lines)

    def confusions(self, k: int = 3) -> dict[str, list[tuple[str, float]]]:
        """What each class is taken for: per class with ground-truth pixels, the ``k``
        predicted classes that hold most of them and their shares (fractions), largest
        first; the class itself is among them when it is predicted often enough."""
        names = self._names()
        out = {}
        for c, row in enumerate(self.matrix):
            total = row.sum()
            if total:
                top = np.argsort(-row, kind="stable")[:k]
                out[names[c]] = [(names[j], float(row[j] / total)) for j in top if row[j]]
        return out

    def confusion_table(self, k: int = 3) -> str:
        """Markdown: class | IoU (%) | what its pixels are predicted as (% of its pixels)."""
        iou = dict(zip(self._names(), self.iou()))
        lines = ["| class | IoU (%) | predicted as (% of the class's pixels) |", "|---|---:|---|"]
        for name, shares in self.confusions(k).items():
            where = ", ".join(f"{other} {100 * share:.0f}" for other, share in shares)
            lines.append(f"| {name} | {100 * iou[name]:.2f} | {where} |")
        return "\n".join(lines)

    def _names(self) -> tuple[str, ...]:
        if self.space is None:
            raise ValueError(f"class names and mIoUs need a label space: {self.num_classes} classes is none of "
                             "cityscapes19, nthu13, robotcar9 (give ConfusionMatrix(..., space=...))")
        return self.space.classes


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def inference_autocast(device: torch.device, enabled: bool):
    """fp16 autocast for inference on a CUDA device (tensor cores: an estimated 2.5-3.5x
    the fp32 convs on a V100), nothing elsewhere: CPU results stay bit-identical."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


@torch.no_grad()  # not inference_mode: callers may edit the result in place
def predict_probs(
    model: torch.nn.Module,
    images: torch.Tensor,
    sizes: Sequence[tuple[int, int]] | None = None,
    flip: bool = False,
    output_size: tuple[int, int] | None = None,
    autocast: bool = False,
) -> torch.Tensor:
    """Softmax probabilities (N, K, H, W), averaged over input sizes and flips.

    ``images``: normalised float (N, 3, H, W). ``sizes``: (width, height) each image is
    resized to before the forward pass (None: as given). ``flip``: also run the mirrored
    image and mirror its output back. ``output_size``: (width, height) of the result
    (None: the input's). Runs in eval mode on the model's device, fp32, or with
    ``autocast`` on a CUDA device the forward pass in fp16 (the softmax and the averaging
    stay fp32); the model's training mode is restored afterwards. The result stays on the
    model's device.
    """
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"expected normalised float images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}: "
            "use normalize"
        )
    device = _model_device(model)
    images = images.to(device)
    in_hw = tuple(images.shape[-2:])
    out_hw = in_hw if output_size is None else (output_size[1], output_size[0])
    sizes_hw = [in_hw] if sizes is None else [(h, w) for w, h in sizes]
    if not sizes_hw:
        raise ValueError("sizes is empty: give at least one (width, height) or None for the input size")

    was_training = model.training
    model.eval()
    total, passes = None, 0
    try:
        for hw in sizes_hw:
            # align_corners=True throughout, like the model's own logit upsampling.
            x = images if hw == in_hw else F.interpolate(images, size=hw, mode="bilinear", align_corners=True)
            for mirrored in (False, True) if flip else (False,):
                with inference_autocast(device, autocast):
                    logits = model(x.flip(-1) if mirrored else x)
                probs = logits.float().softmax(1)
                if mirrored:
                    probs = probs.flip(-1)
                if tuple(probs.shape[-2:]) != out_hw:
                    probs = F.interpolate(probs, size=out_hw, mode="bilinear", align_corners=True)
                total = probs if total is None else total + probs
                passes += 1
    finally:
        model.train(was_training)
    return total / passes


def evaluate(
    model: torch.nn.Module,
    samples: Iterable,
    sizes: Sequence[tuple[int, int]] | None = None,
    flip: bool = False,
    num_classes: int = NUM_CLASSES,
    progress: bool = True,
    space: str | LabelSpace | None = None,
) -> ConfusionMatrix:
    """Confusion matrix of ``model`` over (image, label) pairs, predicted at label resolution.

    ``samples``: any iterable (a Dataset, a DataLoader, a list) of uint8 RGB images
    (H, W, 3) or batches (N, H, W, 3) with train-id labels (H, W) or (N, H, W).
    ``sizes``/``flip`` as in :func:`predict_probs` (single scale by default; IAST-MST:
    ``sizes=MST_SIZES``).
    """
    cm = ConfusionMatrix(num_classes, space=space)
    device = _model_device(model)
    total = len(samples) if hasattr(samples, "__len__") else None
    for image, label in tqdm(samples, total=total, desc="evaluate", disable=not progress):
        image = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))
        x = normalize(image.to(device))
        label = _as_numpy(label)
        if x.dim() == 3:
            x, label = x[None], label[None]
        h, w = label.shape[-2:]
        probs = predict_probs(model, x, sizes, flip, output_size=(w, h))
        if probs.shape[1] != num_classes:
            raise ValueError(f"model outputs {probs.shape[1]} classes, evaluation expects {num_classes}")
        cm.update(probs.argmax(1).to(torch.uint8), label)
    return cm
