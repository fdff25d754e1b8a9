"""Pseudo-label selectors: IAS (IAST), CBST class-balanced thresholds, a constant threshold.

Every function takes plain numpy arrays or torch tensors (on any device): ``conf``, the
per-pixel max softmax probability (float16 or float32), and ``argmax``, the predicted
class. Label maps come back as uint8 with IGNORE_INDEX where no label is kept, as numpy
or as a torch tensor on the input's device, like the input.

Percentiles and ranks are read from per-class histograms over the 15,361 float16 values
in [0, 1]. The released IAST code rounds confidences to float16 before its percentile,
so these histograms hold exactly the values it sorts, and the results are bit-identical
to its loop. Histograms of several images add up, so workers can build them in parallel
and only the (cheap) threshold recursion runs in canonical order:

    hists = [sparse_histogram(conf, argmax) for ...]            # any worker, any order
    ias = IAS(alpha)                                             # fresh each round
    thetas = [ias.update_from_histogram(dense_histogram(h)) for h in instances_in_canonical_order]
    label = select(conf, argmax, theta_of_its_instance)          # any worker

pipeline.pseudo_label does this: its labelling actors send each image's sparse histogram
with its prediction, and the driver's selection reads the histograms alone for the
thresholds.

The released code compared float32 confidences with theta; select() on float16-stored
confidences gives the same thresholds but can flip pixels within a float16 step of theta.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.labels import IGNORE_INDEX, NUM_CLASSES

# float16 bit patterns 0x0000 (0.0) .. 0x3C00 (1.0) are the values in [0, 1], in increasing order.
NUM_CODES = 0x3C00 + 1
CODE_VALUES = np.arange(NUM_CODES, dtype=np.uint16).view(np.float16).astype(np.float64)


def _is_torch(x) -> bool:
    return isinstance(x, torch.Tensor)


def _numpy_if_cpu(x):
    """CPU tensors as numpy arrays (shared memory): numpy makes these passes faster there."""
    return x.detach().numpy() if _is_torch(x) and x.device.type == "cpu" else x


def _check_maps(conf, argmax, num_classes: int) -> None:
    if _is_torch(conf) != _is_torch(argmax):
        raise ValueError("conf and argmax must both be numpy arrays or both torch tensors")
    if tuple(conf.shape) != tuple(argmax.shape):
        raise ValueError(f"conf shape {tuple(conf.shape)} != argmax shape {tuple(argmax.shape)}")
    if _is_torch(conf):
        conf_ok = conf.dtype in (torch.float16, torch.float32)
        argmax_ok = not (argmax.dtype.is_floating_point or argmax.dtype.is_complex or argmax.dtype == torch.bool)
    else:
        conf_ok = conf.dtype in (np.float16, np.float32)
        argmax_ok = argmax.dtype.kind in "ui"
    if not conf_ok:
        raise ValueError(f"conf must be float16 or float32 (softmax max), got {conf.dtype}")
    if not argmax_ok:
        raise ValueError(f"argmax must hold integer class ids, got {argmax.dtype}")
    if conf.numel() if _is_torch(conf) else conf.size:
        lo, hi = (float(v) for v in (conf.min(), conf.max()))
        if not (0 <= lo and hi <= 1):  # also rejects NaN
            raise ValueError(f"conf must lie in [0, 1], got values in [{lo}, {hi}]")
        lo, hi = int(argmax.min()), int(argmax.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"argmax must lie in [0, {num_classes}), got values in [{lo}, {hi}]")


def _check_histogram(hist, num_classes: int) -> np.ndarray:
    hist = np.asarray(hist)
    if hist.shape != (num_classes, NUM_CODES) or hist.dtype.kind not in "ui" or (hist < 0).any():
        raise ValueError(
            f"histogram must be non-negative integer counts of shape ({num_classes}, {NUM_CODES}) "
            f"from confidence_histogram, got {hist.dtype} {hist.shape}"
        )
    return hist


def _every_nth_per_class(codes, classes, num_classes: int, stride: int):
    """Keep pixels 0, stride, 2*stride, ... of each class, counted in row-major order."""
    if _is_torch(codes):
        order = torch.sort(classes, stable=True).indices
        counts = torch.bincount(classes, minlength=num_classes)
        starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        rank = torch.arange(classes.numel(), device=classes.device) - starts
    else:
        order = np.argsort(classes, kind="stable")
        counts = np.bincount(classes, minlength=num_classes)
        rank = np.arange(classes.size) - np.repeat(np.cumsum(counts) - counts, counts)
    keep = order[rank % stride == 0]
    return codes[keep], classes[keep]


def _float16_codes(conf: np.ndarray) -> np.ndarray:
    """Bit patterns of conf rounded to float16 (half to even, as astype(np.float16) does)."""
    flat = np.ascontiguousarray(conf).reshape(-1)
    if flat.dtype == np.float16:
        return flat.view(np.uint16) & 0x7FFF  # clears the sign of -0.0
    # In integers, a few times faster than astype: drop 13 of float32's 23 mantissa bits
    # rounding half to even, and rebias the exponent from 127 to 15 (in place: fewer passes).
    bits = flat.view(np.uint32) & 0x7FFFFFFF
    codes = bits >> 13
    codes &= 1
    codes += 0xFFF
    codes += bits
    codes >>= 13
    codes -= (127 - 15) << 10
    if flat.min() < 2**-14:  # float16 subnormals (never from a softmax): convert those exactly
        tiny = np.flatnonzero(bits < 0x38800000)
        codes[tiny] = bits[tiny].view(np.float32).astype(np.float16).view(np.uint16)
    return codes


def _histogram_numpy(conf: np.ndarray, argmax: np.ndarray, num_classes: int, stride: int) -> np.ndarray:
    codes = _float16_codes(conf)
    classes = argmax.reshape(-1)
    if stride > 1:
        codes, classes = _every_nth_per_class(codes, classes.astype(np.intp), num_classes, stride)
    # One pass to the combined index class * NUM_CODES + code, in intp: np.bincount takes
    # intp as it is and converts anything else first (a pass as long as the counting).
    index = np.multiply(classes, NUM_CODES, dtype=np.intp)
    index += codes
    return np.bincount(index, minlength=num_classes * NUM_CODES)


def _histogram_torch(conf: torch.Tensor, argmax: torch.Tensor, num_classes: int, stride: int) -> torch.Tensor:
    # & 0x7FFF clears the sign of -0.0.
    codes = conf.to(torch.float16).reshape(-1).view(torch.int16).long() & 0x7FFF
    classes = argmax.reshape(-1).long()
    if stride > 1:
        codes, classes = _every_nth_per_class(codes, classes, num_classes, stride)
    return torch.bincount(classes * NUM_CODES + codes, minlength=num_classes * NUM_CODES)


def _flat_histogram(conf, argmax, num_classes: int, stride: int):
    """The histogram's num_classes * NUM_CODES cells, flat: numpy, or a tensor on the input's device."""
    conf, argmax = _numpy_if_cpu(conf), _numpy_if_cpu(argmax)
    _check_maps(conf, argmax, num_classes)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if _is_torch(conf):
        return _histogram_torch(conf, argmax, num_classes, stride)
    return _histogram_numpy(conf, argmax, num_classes, stride)


def confidence_histogram(conf, argmax, num_classes: int = NUM_CLASSES, stride: int = 1) -> np.ndarray:
    """Per-class counts of the confidences rounded to float16: int64 (num_classes, NUM_CODES).

    Row c counts the pixels predicted c; column j is the float16 value CODE_VALUES[j].
    ``stride`` > 1 keeps every stride-th pixel of each class in row-major order, as CBST's
    released code subsamples; call it once per image then.
    """
    hist = _flat_histogram(conf, argmax, num_classes, stride)
    if _is_torch(hist):
        hist = hist.cpu().numpy()
    return hist.astype(np.int64, copy=False).reshape(num_classes, NUM_CODES)


def sparse_histogram(conf, argmax, num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """One image's confidence_histogram as its non-empty cells: (flat cell indices, counts),
    both int32. What a labelling actor sends with each prediction: a few thousand cells
    instead of num_classes x 15,361 (on a GPU, only those leave the device)."""
    hist = _flat_histogram(conf, argmax, num_classes, 1)
    if _is_torch(hist):
        cells = hist.nonzero()[:, 0]
        return cells.int().cpu().numpy(), hist[cells].int().cpu().numpy()
    cells = np.flatnonzero(hist)
    return cells.astype(np.int32), hist[cells].astype(np.int32)


def dense_histogram(sparse: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int = NUM_CLASSES) -> np.ndarray:
    """The sum of images' sparse_histogram cells, as a confidence_histogram."""
    hist = np.zeros(num_classes * NUM_CODES, np.int64)
    for cells, counts in sparse:
        hist[cells] += counts  # an image's cells are distinct
    return hist.reshape(num_classes, NUM_CODES)


def _percentile_with_extra(cum: np.ndarray, extra: np.float64, q: np.float64) -> np.float64:
    """np.percentile(V, 100 * q) of V = [extra] + the histogrammed values, without building V.

    Mirrors numpy's 'linear' method step by step (numpy >= 1.22): virtual index (n-1)*q,
    neighbours floor / floor+1, and its two-sided lerp.
    """
    n = int(cum[-1]) + 1
    smaller = np.searchsorted(CODE_VALUES, extra)  # float16 values strictly below extra
    below = int(cum[smaller - 1]) if smaller else 0  # histogrammed values strictly below extra

    def sorted_value(i: int) -> np.float64:  # i-th smallest element of V
        if i == below:
            return extra
        j = i if i < below else i - 1  # rank among the histogrammed values
        return CODE_VALUES[np.searchsorted(cum, j, side="right")]

    virtual = (n - 1) * q
    if virtual >= n - 1:
        return sorted_value(n - 1)
    previous = np.floor(virtual)
    t = virtual - previous
    a, b = sorted_value(int(previous)), sorted_value(int(previous) + 1)
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


class IAS:
    """Instance adaptive selector (IAST, §1), with the released code's arithmetic.

    A fresh IAS per round (theta = 0.9 for every class). Feed instances in canonical order:
    ``update`` moves theta with one instance, ``select(conf, argmax, theta)`` then labels
    that instance with the updated theta.
    """

    def __init__(self, alpha: float, beta: float = 0.9, gamma: float = 8.0, num_classes: int = NUM_CLASSES):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha (selection proportion) must be in (0, 1], got {alpha}")
        if not 0 <= beta <= 1:
            raise ValueError(f"beta (threshold momentum) must be in [0, 1], got {beta}")
        if not gamma >= 0:
            raise ValueError(f"gamma (hard-class exponent) must be >= 0, got {gamma}")
        # Python floats, as the released code read them from its config: numpy then computes
        # (1 - beta) * t_hat in float32 (t_hat is float32) exactly like the released run.
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.num_classes = num_classes
        self.theta = np.full(num_classes, 0.9)  # float64, like np.ones(K) * 0.9

    def update(self, conf, argmax) -> np.ndarray:
        """Move theta with one instance: one image (arrays) or several (sequences of arrays).

        The released code used instances of 2 images (its batch); the percentile is then over
        the pixels of all its images.
        """
        if isinstance(conf, (list, tuple)):
            if len(conf) != len(argmax) or not conf:
                raise ValueError("an instance given as sequences needs as many conf maps as argmax maps (>= 1)")
            hist = sum(confidence_histogram(c, a, self.num_classes) for c, a in zip(conf, argmax))
        else:
            hist = confidence_histogram(conf, argmax, self.num_classes)
        return self.update_from_histogram(hist)

    def update_from_histogram(self, hist) -> np.ndarray:
        """Move theta with one instance given as its confidence_histogram (summed over its images)."""
        cum = np.cumsum(_check_histogram(hist, self.num_classes), axis=1)
        t_hat = np.ones(self.num_classes, dtype=np.float32)  # float32, as in the released ias_thresh
        for c in range(self.num_classes):
            # V = [theta_c] + float16 confidences of class c; q uses the pre-update theta.
            q100 = 100 * (1 - self.alpha * self.theta[c] ** self.gamma)
            t_hat[c] = _percentile_with_extra(cum[c], self.theta[c], np.true_divide(q100, 100))
        self.theta = self.beta * self.theta + (1 - self.beta) * t_hat
        self.theta[self.theta >= 1] = 0.999
        return self.theta.copy()


def _float32_thresholds(theta: np.ndarray) -> np.ndarray:
    """Smallest float32 >= theta: for float16/float32 x, x < theta (float64) iff x < it."""
    rounded = theta.astype(np.float32)
    return np.where(rounded < theta, np.nextafter(rounded, np.float32(np.inf)), rounded)


def _select_numpy(conf: np.ndarray, argmax: np.ndarray, theta: np.ndarray) -> np.ndarray:
    below = conf < _float32_thresholds(theta).take(argmax)
    # 255 | class == 255: one cheap pass instead of a masked assignment.
    return argmax.astype(np.uint8, copy=False) | below.view(np.uint8) * np.uint8(IGNORE_INDEX)


def _select_torch(conf: torch.Tensor, argmax: torch.Tensor, theta: np.ndarray) -> torch.Tensor:
    classes = argmax.long()  # uint8 tensors would index as masks
    below = conf.double() < torch.as_tensor(theta, device=conf.device)[classes]
    return classes.to(torch.uint8).masked_fill(below, IGNORE_INDEX)


def select(conf, argmax, theta) -> np.ndarray | torch.Tensor:
    """label = argmax, IGNORE_INDEX where conf < theta[argmax] (compared as in float64)."""
    theta = np.asarray(theta, dtype=np.float64)
    if theta.ndim != 1 or len(theta) > IGNORE_INDEX:
        raise ValueError(f"theta must be one threshold per class (at most {IGNORE_INDEX}), got shape {theta.shape}")
    as_tensor = _is_torch(conf)
    conf, argmax = _numpy_if_cpu(conf), _numpy_if_cpu(argmax)
    _check_maps(conf, argmax, len(theta))
    if _is_torch(conf):
        return _select_torch(conf, argmax, theta)
    label = _select_numpy(conf, argmax, theta)
    return torch.from_numpy(label) if as_tensor else label


def constant_select(conf, argmax, threshold: float, num_classes: int = NUM_CLASSES) -> np.ndarray | torch.Tensor:
    """Ablation baseline: one threshold for every class."""
    return select(conf, argmax, np.full(num_classes, float(threshold)))


def ias_select_sequence(
    instances: Iterable, alpha: float, beta: float = 0.9, gamma: float = 8.0, num_classes: int = NUM_CLASSES
) -> Iterator[tuple]:
    """Run IAS over (conf, argmax) instances in order; yield (label(s), theta) per instance.

    An instance is one image (two arrays) or several (two sequences); labels mirror that.
    """
    ias = IAS(alpha, beta, gamma, num_classes)
    for conf, argmax in instances:
        theta = ias.update(conf, argmax)
        if isinstance(conf, (list, tuple)):
            yield [select(c, a, theta) for c, a in zip(conf, argmax)], theta
        else:
            yield select(conf, argmax, theta), theta


def cbst_thresholds(hist, portion: float) -> np.ndarray:
    """CBST class-balanced thresholds (§3) from the target set's summed confidence histogram.

    ``hist`` = sum over images of confidence_histogram(conf, argmax, stride=...), with conf /
    argmax of the (prior-weighted, for CBST-SP) probabilities. The released code subsampled
    with stride 4 in its SYNTHIA script and not at all (stride 1) in its GTA5 script.
    theta_c = the floor(N_c * portion)-th largest confidence of class c, where N_c counts one
    extra 0 (the released per-class arrays start with np.float32(0)); theta_c = 1 where class
    c has no pixel, where that rank is 0, or where the value is 0 (released rule: 0 = none).
    """
    hist = _check_histogram(hist, len(hist))
    if not 0 < portion <= 1:
        raise ValueError(f"portion must be in (0, 1], got {portion}")
    theta = np.ones(len(hist))
    for c, row in enumerate(hist):
        count = int(row.sum())
        if count == 0:
            continue
        n = count + 1
        kept = int(math.floor(n * portion))
        if kept == 0:
            continue
        i = n - kept  # ascending rank of the kept-th largest; rank 0 is the extra 0
        value = CODE_VALUES[np.searchsorted(np.cumsum(row), i - 1, side="right")] if i else 0.0
        if value > 0:
            theta[c] = value
    return theta


def _cbst_select_numpy(probs: np.ndarray, theta: np.ndarray) -> np.ndarray:
    ratio = probs.astype(np.float32) / theta.astype(np.float32).reshape((-1,) + (1,) * (probs.ndim - 1))
    label = ratio.argmax(0).astype(np.uint8)
    label[ratio.max(0) < 1] = IGNORE_INDEX
    return label


def _cbst_select_torch(probs: torch.Tensor, theta: np.ndarray) -> torch.Tensor:
    theta = torch.as_tensor(theta, dtype=torch.float32, device=probs.device)
    best, label = (probs.float() / theta.reshape((-1,) + (1,) * (probs.ndim - 1))).max(0)  # first max on ties
    return label.to(torch.uint8).masked_fill(best < 1, IGNORE_INDEX)


def cbst_select(probs, theta) -> np.ndarray | torch.Tensor:
    """label = argmax_k P_k / theta_k, kept where max_k P_k / theta_k >= 1 (float32, as released).

    probs: (K, ...) probabilities, already multiplied by the spatial prior for CBST-SP.
    """
    theta = np.asarray(theta, dtype=np.float64)
    if theta.ndim != 1 or probs.shape[0] != len(theta):
        raise ValueError(f"theta must hold one threshold per class of probs {tuple(probs.shape)}, got {theta.shape}")
    if (theta <= 0).any():
        raise ValueError("theta must be positive (cbst_thresholds returns 1 for empty classes)")
    as_tensor = _is_torch(probs)
    probs = _numpy_if_cpu(probs)
    if probs.dtype not in ((torch.float16, torch.float32) if _is_torch(probs) else (np.float16, np.float32)):
        raise ValueError(f"probs must be float16 or float32, got {probs.dtype}")
    if _is_torch(probs):
        return _cbst_select_torch(probs, theta)
    label = _cbst_select_numpy(probs, theta)
    return torch.from_numpy(label) if as_tensor else label


def spatial_prior(label_maps: Iterable[np.ndarray], size: Sequence[int], num_classes: int = NUM_CLASSES) -> np.ndarray:
    """CBST-SP spatial prior from source train-id maps: float32 (num_classes, H, W).

    Maps are resized to size = (H, W) with nearest neighbour; per class, the pixel counts
    are normalised to sum 1 over the image (classes never seen stay 0). All classes are
    then divided by one common factor so the largest value is 1: a common factor changes
    neither argmax_k P_k q_k nor the CBST ratios, and keeps P * prior in float16 range.
    """
    height, width = size
    counts = np.zeros((num_classes, height * width), dtype=np.int64)
    pixels = np.arange(height * width)
    seen = 0
    for label in label_maps:
        label = np.asarray(label)
        if label.ndim != 2 or label.dtype != np.uint8:
            raise ValueError(f"label maps must be 2-D uint8 train-id maps, got {label.dtype} {label.shape}")
        if label.shape != (height, width):
            label = np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))
        label = label.ravel()
        valid = label != IGNORE_INDEX
        if (label[valid] >= num_classes).any():
            raise ValueError(
                f"label maps must hold train ids < {num_classes} or {IGNORE_INDEX}, got {label[valid].max()}"
            )
        counts[label[valid], pixels[valid]] += 1  # one class per pixel: no repeated index
        seen += 1
    if not seen:
        raise ValueError("spatial_prior needs at least one source label map")
    counts = counts.reshape(num_classes, height, width).astype(np.float64)
    totals = counts.sum(axis=(1, 2), keepdims=True)
    prior = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    if not prior.any():
        raise ValueError("spatial_prior: the source label maps hold no labelled pixel")
    return (prior / prior.max()).astype(np.float32)


def cbst_portion(round_index: int, start: float = 0.2, step: float = 0.05, maximum: float = 0.5) -> float:
    """CBST's selected portion p in round round_index (0-based): start + step per round, capped.

    Released: start 0.2 (CBST) or 0.15 (CBST-SP), step 0.05, max 0.5. Its driver added the
    step while p < max in floats (0.2 + 0.05 + ... = 0.49999999999999994 < 0.5), so one round
    after 0.5 it reached 0.55; here p stops at max. Rounded to 12 digits, as Python 2's str()
    passed p on to the labelling script.
    """
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    return min(round(start + step * round_index, 12), maximum)


class ClassConfidence:
    """HIAST's per-class difficulty (reference §4): an EMA, over the images in canonical
    order, of the mean confidence of the pixels each class keeps as pseudo-labels.

    A class's EMA starts at its first observed mean (not at a constant, which would
    dominate the few images of a rare class); a class that never keeps a pixel has none
    (NaN) and is never hard: there is nothing of it to paste.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, momentum: float = 0.99):
        self.momentum = momentum
        self.value = np.full(num_classes, np.nan)

    def update(self, conf, label) -> np.ndarray:
        """One image: ``conf`` its per-pixel confidence, ``label`` its selected pseudo-label."""
        return self.update_from_sums(*self.kept_sums(conf, label, len(self.value)))

    @staticmethod
    def kept_sums(conf, label, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """One image's kept pixels per class and the sum of their confidence: what
        ``update_from_sums`` needs (computed where the image is, applied in order)."""
        conf, label = np.asarray(conf, np.float64).ravel(), np.asarray(label).ravel()
        kept = label != IGNORE_INDEX
        counts = np.bincount(label[kept], minlength=num_classes)[:num_classes]
        return counts, np.bincount(label[kept], weights=conf[kept], minlength=num_classes)[:num_classes]

    def update_from_sums(self, counts: np.ndarray, sums: np.ndarray) -> np.ndarray:
        """``update`` from one image's ``kept_sums``."""
        k = len(self.value)
        seen = counts > 0
        mean = np.divide(sums, counts, out=np.zeros(k), where=seen)
        first = seen & np.isnan(self.value)
        self.value[first] = mean[first]
        again = seen & ~first
        self.value[again] = self.momentum * self.value[again] + (1 - self.momentum) * mean[again]
        return self.value


def hard_classes(confidence: Sequence[float | None], num_hard: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``num_hard`` classes of lowest confidence (among those with one) and HIAST's
    sampling probabilities for them, p_c ∝ (1 - v_c)^2. A set of classes all at
    confidence 1 gets uniform probabilities."""
    v = np.array([np.nan if c is None else c for c in confidence], np.float64)
    known = np.flatnonzero(~np.isnan(v))
    hard = known[np.argsort(v[known], kind="stable")][:num_hard]
    weight = (1 - v[hard]) ** 2
    probs = weight / weight.sum() if weight.sum() > 0 else np.full(len(hard), 1 / max(1, len(hard)))
    return hard, probs
