"""Reading the prepared datasets: sample lists, images, train-id labels.

Training, evaluation and pseudo-labelling read one thing: the output of
``jobs/prepare_data.py`` (see ``pipeline.data.prepare``). Under its output folder
``<prepared>`` (the dataset root unless ``--out`` was given) it holds, per split:

- ``lists/<dataset>_<split>.txt``: one frame per line, sorted by name, tab-separated
  ``name``, image path relative to the dataset root, and train-id label path relative
  to ``<prepared>`` (the last field is absent for an unlabeled split);
- ``trainids/<dataset>/<split>/<name>.png``: 8-bit labels in train ids, 255 = ignore;
- ``stats/<dataset>_<split>.parquet``: per-image class statistics.

Every path may be a local folder or an ``s3://`` URI.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch.utils.data
from PIL import Image

from pipeline import storage
from pipeline.labels import IGNORE_INDEX, NUM_CLASSES

NTHU_CITIES = ("Rome", "Rio", "Tokyo", "Taipei")  # NTHU Cross-City (reference §11)
SPLITS: dict[str, tuple[str, ...]] = {
    "gta5": ("train",),
    "synthia": ("train",),
    "cityscapes": ("train", "val"),
    # per city: its unlabelled train images and its labelled test images
    "nthu": tuple(f"{city.lower()}_{part}" for city in NTHU_CITIES for part in ("train", "test")),
    "robotcar": ("train", "val"),  # Oxford RobotCar as HIAST uses it: 894 unlabelled, 271 labelled
}
DATASETS: tuple[str, ...] = tuple(SPLITS)
PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC: the last bytes of every whole PNG
JPEG_END = b"\xff\xd9"  # the end-of-image marker


@dataclass(frozen=True)
class Sample:
    name: str  # frame name, unique within its split: "00001", "aachen_000000_000019"
    image: str  # URI of the RGB image
    label: str | None  # URI of the train-id label PNG; None for an unlabeled split


def check_dataset(dataset: str) -> None:
    if dataset not in SPLITS:
        raise ValueError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")


@dataclass(frozen=True)
class DataConfig:
    """A prepared dataset split, as the configs name it."""

    dataset: str  # gta5 | synthia | cityscapes | nthu | robotcar
    root: str  # the dataset folder (local or s3://)
    split: str = "train"
    prepared: str | None = None  # where jobs/prepare_data.py wrote lists and labels (default: root)

    def __post_init__(self):
        check_split(self.dataset, self.split)
        storage.check_fields(self, "root", "prepared")
        object.__setattr__(self, "root", storage.absolute(self.root))
        object.__setattr__(self, "prepared", storage.absolute(self.prepared))

    def samples(self) -> list[Sample]:
        return list_samples(self.dataset, self.root, self.split, self.prepared)

    def fingerprint(self) -> str:
        """A digest of the prepared split: its frame list and its statistics, which hold
        every image's digest and every label's class counts. It changes when a frame is
        added, removed, re-rendered or relabelled (and ``jobs/prepare_data.py`` re-run),
        so that work finished on other data is never silently reused."""
        digest = hashlib.sha256()
        prepared = self.prepared or self.root
        for uri in (list_uri(prepared, self.dataset, self.split), stats_uri(prepared, self.dataset, self.split)):
            digest.update(storage.read_bytes(uri) if storage.exists(uri) else b"missing")
        return digest.hexdigest()[:16]


    def stats_uri(self) -> str:
        return stats_uri(self.prepared or self.root, self.dataset, self.split)

    def label_space(self) -> str | None:
        """The label space the prepared train ids are in (None: an older preparation, or
        Cityscapes-19, which leaves it unwritten so that its files stay as they were)."""
        return prepared_label_space(self.stats_uri())


def prepared_label_space(stats: str) -> str | None:
    """The ``label_space`` that ``jobs/prepare_data.py`` wrote into a statistics file."""
    import pyarrow.parquet as pq

    if not storage.exists(stats):
        return None
    with storage.open_file(stats, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    value = meta.get(b"label_space")
    return value.decode() if value else None


# Semi-supervised Cityscapes (jobs/prepare_data.py --semi): train's labelled share and the
# rest, e.g. train_labeled_1-8 / train_unlabeled_1-8 (a fraction), train_labeled_372 (a count).
SEMI_SPLIT = re.compile(r"train_(labeled|unlabeled)_(\d+-\d+|\d+)")


def check_split(dataset: str, split: str) -> None:
    check_dataset(dataset)
    if dataset == "cityscapes" and SEMI_SPLIT.fullmatch(split):
        return
    if split not in SPLITS[dataset]:
        raise ValueError(
            f"{dataset} has no split {split!r}: use one of {', '.join(SPLITS[dataset])}"
            + (" (or train_labeled_<F> / train_unlabeled_<F> written by jobs/prepare_data.py --semi F)"
               if dataset == "cityscapes" else "")
        )


def list_uri(prepared: str, dataset: str, split: str) -> str:
    return storage.join(prepared, "lists", f"{dataset}_{split}.txt")


def stats_uri(prepared: str, dataset: str, split: str) -> str:
    return storage.join(prepared, "stats", f"{dataset}_{split}.parquet")


def trainid_path(dataset: str, split: str, name: str) -> str:
    """Path of a frame's train-id label, relative to the prepared folder."""
    return f"trainids/{dataset}/{split}/{name}.png"


def list_samples(
    dataset: str, root: str, split: str, prepared: str | None = None
) -> list[Sample]:
    """The frames of a prepared split, in the canonical order (sorted by name).

    ``root`` is the dataset folder the images are read from; ``prepared`` the folder
    ``jobs/prepare_data.py`` wrote to (default: ``root``).
    """
    check_split(dataset, split)
    prepared = prepared or root
    uri = list_uri(prepared, dataset, split)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"no prepared list {uri}: run `python jobs/prepare_data.py --dataset {dataset} "
            f"--root {root}" + (f" --out {prepared}`" if prepared != root else "`")
        )
    samples, seen = [], {}
    for number, line in enumerate(storage.read_bytes(uri).decode().splitlines(), 1):
        fields = line.split("\t")
        if len(fields) not in (2, 3):
            raise ValueError(
                f"{uri} line {number}: expected name, image and optional label separated "
                f"by tabs, got {line!r}; re-run jobs/prepare_data.py"
            )
        if fields[0] in seen:  # a frame twice would be trained on and labelled twice
            raise ValueError(
                f"{uri} line {number}: frame {fields[0]} listed again (first on line {seen[fields[0]]}); "
                "re-run jobs/prepare_data.py"
            )
        seen[fields[0]] = number
        label = storage.join(prepared, fields[2]) if len(fields) == 3 else None
        samples.append(Sample(fields[0], storage.join(root, fields[1]), label))
    if not samples:
        raise ValueError(f"{uri} lists no frames: re-run jobs/prepare_data.py")
    return samples


def _open_image(uri: str) -> Image.Image:
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: file not found") from None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"{uri}: unreadable or corrupt image ({e})") from None
    # cut in its last bytes, a file may still decode: its end marker tells
    if (image.format == "PNG" and not data.endswith(PNG_END)) or (
            image.format == "JPEG" and not data.endswith(JPEG_END)):
        raise ValueError(f"{uri}: unreadable or corrupt image (truncated: no {image.format} end marker); copy it again")
    return image


def load_image(uri: str) -> np.ndarray:
    """RGB image as uint8 (H, W, 3)."""
    image = _open_image(uri)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image)  # writable: torch.from_numpy warns on read-only arrays


def load_label(uri: str) -> np.ndarray:
    """Prepared train-id label as uint8 (H, W): 0..18, 255 = ignore."""
    image = _open_image(uri)
    if image.mode not in ("L", "P"):
        raise ValueError(
            f"{uri}: expected an 8-bit single-channel train-id PNG, got mode {image.mode}; "
            "read labels written by jobs/prepare_data.py"
        )
    label = np.asarray(image)
    bad = (label >= NUM_CLASSES) & (label != IGNORE_INDEX)
    if bad.any():
        raise ValueError(
            f"{uri}: values {sorted(set(np.unique(label[bad]).tolist()))[:10]} are not train "
            f"ids (0..{NUM_CLASSES - 1}, {IGNORE_INDEX}); is this a raw label-id file? "
            "Read labels written by jobs/prepare_data.py"
        )
    return label


Transform = Callable[[np.ndarray, np.ndarray], tuple]


class SegmentationDataset(torch.utils.data.Dataset):
    """``(image, label)`` pairs: uint8 (H, W, 3) RGB and uint8 (H, W) train ids.

    A sample without a label (an unlabeled target split) gets an all-ignore label, so
    labeled and unlabeled data share one collate. ``transform(image, label)`` returns the
    pair to yield.
    """

    def __init__(self, samples: Sequence[Sample], transform: Transform | None = None):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image = load_image(sample.image)
        if sample.label is None:
            label = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        else:
            label = load_label(sample.label)
            if label.shape != image.shape[:2]:
                raise ValueError(
                    f"{sample.label}: label is {label.shape[1]}x{label.shape[0]} but image "
                    f"{sample.image} is {image.shape[1]}x{image.shape[0]}; re-run "
                    "jobs/prepare_data.py"
                )
        if self.transform is not None:
            return self.transform(image, label)
        return image, label
