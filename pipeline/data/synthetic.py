"""Synthetic GTA5 and Cityscapes at the real datasets' image sizes, in their on-disk layouts.

The built-in benchmark's street scenes (``pipeline.data.benchmark.render``), drawn at
GTA5's 1914x1052 and Cityscapes' 2048x1024 instead of 256x140 and 256x128, so that
``jobs/prepare_data.py`` and everything after it meet files like the real ones: RGB PNGs
of about 2 MB (the real ones: 1.5-3 MB), GTA5 palette PNGs and Cityscapes 8-bit
``*_gtFine_labelIds.png`` holding Cityscapes label ids. The rehearsal
(``jobs/rehearsal.py``) runs the GTA5 -> Cityscapes config on them::

    <out>/GTA5/images/00001.png, <out>/GTA5/labels/00001.png
    <out>/cityscapes/leftImg8bit/{train,val}/<city>/<city>_000000_NNNNNN_leftImg8bit.png
    <out>/cityscapes/gtFine/{train,val}/<city>/<city>_000000_NNNNNN_gtFine_labelIds.png

Every frame has its own random generator seeded by (seed, set, index), so the files do
not depend on the number of worker processes.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.data.benchmark import SOURCE, TARGET, TRAIN_CITIES, VAL_CITIES, map_frames, render
from pipeline.labels import CITYSCAPES_ID_TO_TRAIN, colorize

GTA5_SIZE = (1914, 1052)  # (width, height) of a GTA5 frame
CITYSCAPES_SIZE = (2048, 1024)
SETS = ("gta5", "cityscapes_train", "cityscapes_val")


def frame_paths(out: str, set_name: str, index: int) -> tuple[str, str]:
    """Image and label path of frame ``index`` (0-based) of ``set_name`` (one of SETS)."""
    if set_name == "gta5":
        name = f"{index + 1:05d}.png"
        return storage.join(out, "GTA5", "images", name), storage.join(out, "GTA5", "labels", name)
    split = set_name.removeprefix("cityscapes_")
    cities = TRAIN_CITIES if split == "train" else VAL_CITIES
    city = cities[index % len(cities)]
    stem = f"{city}_000000_{index:06d}"
    root = storage.join(out, "cityscapes")
    return (storage.join(root, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png"),
            storage.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png"))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write_frame(task: tuple[str, int, int, str, tuple[int, int]]) -> int:
    """Render and write one frame; returns the bytes written."""
    set_name, index, seed, out, size = task
    domain = replace(SOURCE if set_name == "gta5" else TARGET, size=size)
    image, ids = render(domain, np.random.default_rng([seed, SETS.index(set_name), index]))
    label = Image.fromarray(ids)
    if set_name == "gta5":  # GTA5 ships palette PNGs; putpalette keeps the values (label ids)
        label.putpalette(colorize(CITYSCAPES_ID_TO_TRAIN[np.arange(256, dtype=np.uint8)]).tobytes())
    image_path, label_path = frame_paths(out, set_name, index)
    data = [_png(Image.fromarray(image)), _png(label)]
    storage.write_bytes(image_path, data[0])
    storage.write_bytes(label_path, data[1])
    return sum(map(len, data))


def write(out: str, num_source: int, num_target_train: int, num_target_val: int, seed: int = 0,
          source_size: tuple[int, int] = GTA5_SIZE, target_size: tuple[int, int] = CITYSCAPES_SIZE,
          workers: int | None = None) -> dict:
    """Write the three sets under ``out``; returns their roots and the bytes written."""
    counts = dict(zip(SETS, (num_source, num_target_train, num_target_val)))
    if min(counts.values()) < 1:
        raise ValueError(f"every set needs at least one frame, got {counts}")
    tasks = [(name, i, seed, out, tuple(source_size if name == "gta5" else target_size))
             for name, n in counts.items() for i in range(n)]
    written = sum(map_frames(_write_frame, tasks, workers, chunksize=2))
    return {"gta5": storage.join(out, "GTA5"), "cityscapes": storage.join(out, "cityscapes"),
            "frames": counts, "bytes": written}
