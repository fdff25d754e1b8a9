"""Training augmentation of the released IAST (reference §5), HIAST's weak and strong
views (reference §4) and ImageNet normalisation.

A sample is (image, label): a uint8 HWC RGB numpy image and an integer HW numpy label
map. All randomness comes from the numpy Generator passed to each call, so a seeded
Generator fixes the output. The training preset follows the released albumentations
pipeline: HorizontalFlip(p=0.5), RandomBrightnessContrast(p=0.3), RandomSizedCrop with
w = 2h resized to 512x1024 (image bilinear, label nearest), then ImageNet mean/std (on
the training device: the DataLoader passes uint8 tensors, see ``model_input``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Crop heights of the released code at the datasets' full resolution (pixels).
GTA5_CROP_HEIGHTS = (341, 950)
SYNTHIA_CROP_HEIGHTS = (341, 640)
CITYSCAPES_CROP_HEIGHTS = (341, 1000)
OUTPUT_SIZE = (512, 1024)  # (height, width)

Sample = tuple[np.ndarray, np.ndarray]
Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple]


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"expected a uint8 HxWx3 RGB numpy image, got "
            f"{getattr(image, 'dtype', type(image))} of shape {getattr(image, 'shape', None)}"
        )


def normalize(image: np.ndarray | Tensor) -> Tensor:
    """uint8 RGB (H, W, 3) or (N, H, W, 3), numpy or tensor → float32 (3, H, W) or
    (N, 3, H, W) on the input's device: (x/255 - mean) / std with ImageNet statistics."""
    # np.array copies: arrays backed by PIL images are read-only, which torch warns about.
    x = image if isinstance(image, Tensor) else torch.from_numpy(np.array(image))
    if x.dtype != torch.uint8 or x.dim() not in (3, 4) or x.shape[-1] != 3:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3) or batch (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    x = x.movedim(-1, -3).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return x.sub_(mean).div_(std)


class Compose:
    """Applies transforms in order; checks the sample once on the way in."""

    def __init__(self, transforms: list[Transform]):
        self.transforms = transforms

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple:
        _check_image(image)
        if not isinstance(label, np.ndarray) or label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
            raise ValueError(
                f"expected an integer HxW numpy label map, got "
                f"{getattr(label, 'dtype', type(label))} of shape {getattr(label, 'shape', None)}"
            )
        if label.shape != image.shape[:2]:
            raise ValueError(f"label shape {label.shape} does not match image shape {image.shape[:2]}")
        sample = (image, label)
        for transform in self.transforms:  # the last one may return more (e.g. two views)
            sample = transform(*sample, rng)
        return sample


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def draw(self, rng: np.random.Generator) -> bool:
        return bool(rng.random() < self.p)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Sample:
        if self.draw(rng):
            image, label = np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(label[:, ::-1])
        return image, label


class RandomBrightnessContrast:
    """albumentations' RandomBrightnessContrast with its defaults (the released code's):
    x → clip(alpha·x + beta·255) with alpha = 1 + U(-contrast_limit, contrast_limit),
    beta = U(-brightness_limit, brightness_limit), truncated to uint8 through a lookup table.
    """

    def __init__(self, brightness_limit: float = 0.2, contrast_limit: float = 0.2, p: float = 0.3):
        self.brightness_limit = brightness_limit
        self.contrast_limit = contrast_limit
        self.p = p

    def draw(self, rng: np.random.Generator) -> np.ndarray | None:
        """The uint8 lookup table of one draw, or None (no change)."""
        if rng.random() >= self.p:
            return None
        alpha = 1.0 + rng.uniform(-self.contrast_limit, self.contrast_limit)
        beta = rng.uniform(-self.brightness_limit, self.brightness_limit)
        lut = np.arange(256, dtype=np.float32)
        lut *= alpha
        lut += beta * 255
        return np.clip(lut, 0, 255).astype(np.uint8)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Sample:
        lut = self.draw(rng)
        return (image, label) if lut is None else (lut[image], label)


class RandomSizedCrop:
    """Crop of height drawn uniformly from the integers in ``height_range`` (pixels of the
    input image, both ends included) and width = height · out_w / out_h, at a uniformly
    random position, resized to ``output_size`` (height, width).

    A crop larger than the image is shrunk to the largest one of that aspect that fits.
    Resizing as albumentations' cv2 defaults: bilinear with half-pixel centres for the
    image (rounded back to uint8), nearest for the label (output (r, c) takes input
    (⌊r·h/out_h⌋, ⌊c·w/out_w⌋)), so label values are never mixed.
    """

    def __init__(self, height_range: tuple[int, int], output_size: tuple[int, int] = OUTPUT_SIZE):
        min_height, max_height = height_range
        if not 0 < min_height <= max_height:
            raise ValueError(f"height_range must be (min, max) with 0 < min <= max, got {height_range}")
        if min(output_size) <= 0:
            raise ValueError(f"output_size must be a positive (height, width), got {output_size}")
        self.height_range = (int(min_height), int(max_height))
        self.output_size = (int(output_size[0]), int(output_size[1]))
        self.aspect = self.output_size[1] / self.output_size[0]

    def draw(self, shape: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(top, left, height, width) of one crop of an image of ``shape`` (height, width)."""
        height, width = shape
        crop_height = int(rng.integers(self.height_range[0], self.height_range[1], endpoint=True))
        crop_height = min(crop_height, height, int(width / self.aspect))
        crop_width = int(crop_height * self.aspect)
        if crop_height < 1 or crop_width < 1:
            raise ValueError(f"image of size {height}x{width} is too small for a crop of aspect {self.aspect}")
        top = int((height - crop_height) * rng.random())
        left = int((width - crop_width) * rng.random())
        return top, left, crop_height, crop_width

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Sample:
        top, left, height, width = self.draw(label.shape, rng)
        return self.resize(image[top:top + height, left:left + width], label[top:top + height, left:left + width])

    def resize(self, image: np.ndarray, label: np.ndarray) -> Sample:
        """A crop (image, label) at ``output_size``."""
        return self._resize_image(image), self._resize_label(label)

    def _resize_image(self, image: np.ndarray) -> np.ndarray:
        # a crop of a cached (read-only) frame is copied: torch warns on read-only arrays
        if not (image.flags.writeable and image.flags.c_contiguous):
            image = np.array(image, order="C")
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=self.output_size, mode="bilinear", align_corners=False)
        return x[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()

    def _resize_label(self, label: np.ndarray) -> np.ndarray:
        (height, width), (out_height, out_width) = label.shape, self.output_size
        rows = np.arange(out_height) * height // out_height
        cols = np.arange(out_width) * width // out_width
        return label[rows[:, None], cols[None, :]]


class FlipColourCrop:
    """``RandomHorizontalFlip``, then ``RandomBrightnessContrast`` (if given), then
    ``RandomSizedCrop``: the same random draws in the same order and the same output, bit
    for bit, but the flip and the colour change are applied to the crop's pixels only.
    Both are per-pixel (a mirror, a lookup table), so they commute with taking the crop;
    on a full-size frame they cost more than the crop itself (docs/performance.md)."""

    def __init__(self, flip: RandomHorizontalFlip, crop: RandomSizedCrop,
                 colour: RandomBrightnessContrast | None = None):
        self.flip, self.crop, self.colour = flip, crop, colour

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Sample:
        flipped = self.flip.draw(rng)
        lut = self.colour.draw(rng) if self.colour is not None else None
        top, left, height, width = self.crop.draw(label.shape, rng)
        if flipped:  # the crop at `left` of the mirrored frame is the mirror of this one
            left = label.shape[1] - left - width
        rows, cols = slice(top, top + height), slice(left, left + width)
        image, label = image[rows, cols], label[rows, cols]
        if flipped:
            image, label = image[:, ::-1], label[:, ::-1]
        if lut is not None:
            image = lut[image]
        return self.crop.resize(image, label)


class Normalize:
    """Final step: ImageNet-normalised float32 CHW image tensor and int64 HW label tensor."""

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        return normalize(image), torch.from_numpy(label.astype(np.int64))


def _uint8_tensor(array: np.ndarray) -> Tensor:
    # Train ids and 255 fit a byte. np.array copies: views of PIL images are read-only.
    return torch.from_numpy(np.array(array, np.uint8))


class ToTensors:
    """Final step of a training sample: uint8 HWC image and uint8 HW label tensors, a
    quarter and an eighth of float32 and int64 through the DataLoader's shared memory
    and the copy to the GPU; ``model_input`` normalises a batch on the device."""

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        return _uint8_tensor(image), _uint8_tensor(label)


def model_input(batch: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """A training batch from the DataLoader as the model takes it, on ``device``: uint8
    images (N, H, W, 3) ImageNet-normalised to float32 (N, 3, H, W), uint8 labels
    (N, H, W) as int64."""
    batch = batch.to(device, non_blocking=True)
    return normalize(batch) if batch.dim() == 4 else batch.long()


def _colour_jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.6, 1.4))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.6, 1.4))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
    # Hue: rotate the H channel by up to ±0.1 of a turn.
    h, s, v = image.convert("HSV").split()
    shift = int(rng.uniform(-0.1, 0.1) * 256)
    h = h.point(lambda x: (x + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


# The 8 colour operations of HIAST's strong view; each maps (PIL RGB image, rng) -> image.
COLOUR_OPS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "jitter": _colour_jitter,
    "blur": lambda im, rng: im.filter(ImageFilter.GaussianBlur(rng.uniform(0.1, 2.0))),
    "contrast": lambda im, rng: ImageEnhance.Contrast(im).enhance(rng.uniform(0.05, 0.95) * 2),
    "brightness": lambda im, rng: ImageEnhance.Brightness(im).enhance(rng.uniform(0.05, 0.95) * 2),
    "posterize": lambda im, rng: ImageOps.posterize(im, int(rng.integers(4, 8))),
    "equalize": lambda im, rng: ImageOps.equalize(im),
    "solarize": lambda im, rng: ImageOps.solarize(im, int(rng.integers(128, 256))),
    "gray": lambda im, rng: ImageOps.grayscale(im).convert("RGB"),
}


class StrongColour:
    """HIAST's strong photometric view: ``num_ops`` of the 8 colour operations, drawn
    without replacement, each applied with probability ``p``. Colour only, so the view
    keeps the weak view's geometry and labels."""

    def __init__(self, num_ops: int = 3, p: float = 0.5):
        if not 0 <= num_ops <= len(COLOUR_OPS):
            raise ValueError(f"num_ops must be in 0..{len(COLOUR_OPS)}, got {num_ops}")
        self.num_ops, self.p = num_ops, p

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        names = list(COLOUR_OPS)
        picked = rng.choice(len(names), size=self.num_ops, replace=False)
        out = Image.fromarray(image)
        for i in picked:
            if rng.random() < self.p:
                out = COLOUR_OPS[names[i]](out, rng)
        return np.asarray(out)


class WeakStrongViews:
    """Final step of HIAST's augmentation: (weak image, strong image, label) uint8 tensors
    (as :class:`ToTensors`), the strong image being the weak one after :class:`StrongColour`."""

    def __init__(self, strong: StrongColour | None = None):
        self.strong = strong or StrongColour()

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, Tensor, Tensor]:
        strong = self.strong(image, rng)
        return _uint8_tensor(image), _uint8_tensor(strong), _uint8_tensor(label)


class HardClassPaste:
    """HIAST's hard-aware pseudo-label augmentation (reference §4), the first step of a
    self-training sample: draw a hard class c with probability ``probs``, a donor image
    that pseudo-labels c (uniformly among ``donors[c]``), and paste every donor pixel whose
    pseudo-label is any hard class into the sample, image and label alike.

    ``load_donor(i)`` -> (image, label) of donor i, at the sample's size.
    """

    def __init__(self, hard: Sequence[int], probs: Sequence[float], donors: dict[int, Sequence[int]],
                 load_donor: Callable[[int], tuple[np.ndarray, np.ndarray]]):
        usable = [i for i, c in enumerate(hard) if len(donors.get(int(c), ())) > 0]
        self.hard = np.asarray(hard, np.int64)
        self.classes = self.hard[usable]  # empty (nothing to paste: samples pass unchanged)
        weights = np.asarray(probs, np.float64)[usable]
        self.probs = weights / weights.sum() if weights.sum() > 0 else np.full(len(usable), 1 / max(1, len(usable)))
        self.donors = {int(c): np.asarray(donors[int(c)]) for c in self.classes}
        self.load_donor = load_donor

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Sample:
        if not len(self.classes):
            return image, label
        c = int(self.classes[rng.choice(len(self.classes), p=self.probs)])
        pool = self.donors[c]
        donor_image, donor_label = self.load_donor(int(pool[rng.integers(len(pool))]))
        if donor_label.shape != label.shape or donor_image.shape != image.shape:
            raise ValueError(f"donor of size {donor_label.shape} cannot be pasted into a sample of size {label.shape}")
        mask = np.isin(donor_label, self.hard)
        image, label = image.copy(), label.copy()
        image[mask], label[mask] = donor_image[mask], donor_label[mask]
        return image, label


def hard_class_donors(class_kept: np.ndarray, classes: Sequence[int], drop_smallest: float = 0.1) -> dict[int, np.ndarray]:
    """Per class, the images (rows of ``class_kept``, pixels kept per image and class) that
    pseudo-label it, without the ``drop_smallest`` share with the fewest such pixels."""
    donors = {}
    for c in classes:
        counts = class_kept[:, c]
        having = np.flatnonzero(counts > 0)
        order = having[np.argsort(counts[having], kind="stable")]
        donors[int(c)] = np.sort(order[int(len(order) * drop_smallest):])
    return donors


def train_transform(crop_height_range: tuple[int, int], output_size: tuple[int, int] = OUTPUT_SIZE,
                    first: Sequence[Transform] = ()) -> Compose:
    """The released IAST training augmentation; call as ``transform(image, label, rng)``
    -> uint8 tensors (normalised on the device by ``model_input``). ``first``: steps
    before it (e.g. :class:`HardClassPaste`)."""
    return Compose([
        *first,
        FlipColourCrop(RandomHorizontalFlip(p=0.5), RandomSizedCrop(crop_height_range, output_size),
                       RandomBrightnessContrast(p=0.3)),
        ToTensors(),
    ])


def weak_strong_transform(crop_height_range: tuple[int, int], output_size: tuple[int, int] = OUTPUT_SIZE,
                          first: Sequence[Transform] = ()) -> Compose:
    """HIAST's views: weak = flip + random sized crop; strong = weak + 3 of 8 colour
    operations (p 0.5 each), same geometry and labels. Returns (weak, strong, label)."""
    return Compose([
        *first,
        FlipColourCrop(RandomHorizontalFlip(p=0.5), RandomSizedCrop(crop_height_range, output_size)),
        WeakStrongViews(StrongColour(num_ops=3, p=0.5)),
    ])


def eval_transform() -> Compose:
    """Normalisation only; call as ``transform(image, label, rng)`` (rng is unused)."""
    return Compose([Normalize()])
