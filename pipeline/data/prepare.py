"""Validate a dataset in its official on-disk layout and write what training reads.

Layouts (paths relative to the dataset root; ``<name>`` is the frame name):

- ``gta5``: ``images/<name>.png`` (RGB), ``labels/<name>.png`` (8-bit Cityscapes label
  ids). All frames form the split ``train``, less ``GTA5_RELEASED_EXCLUDED``.
- ``synthia`` (SYNTHIA-RAND-CITYSCAPES): ``RGB/<name>.png``, ``GT/LABELS/<name>.png``
  (16-bit PNG, class id in the first channel). All frames form ``train``.
- ``cityscapes``: ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` and
  ``gtFine/<split>/<city>/<name>_gtFine_labelIds.png`` with ``<name>`` =
  ``<city>_<seq>_<frame>``, splits ``train`` and ``val``. gtFine's other files
  (``_color``, ``_instanceIds``, ``_polygons.json``, cityscapesScripts' ``*TrainIds``)
  are ignored. A split with no ``gtFine/<split>/`` folder is prepared unlabeled (a UDA
  target needs no labels).
- ``nthu`` (NTHU Cross-City, one ``--city`` at a time: Rome, Rio, Tokyo, Taipei):
  ``<City>/Images/Train/<name>.jpg`` (unlabelled: split ``<city>_train``),
  ``<City>/Images/Test/<name>.jpg`` and ``<City>/Labels/Test/<name>_eval.png`` (8-bit
  Cityscapes label ids: split ``<city>_test``), ``<city>`` in lower case. Its train ids
  are those of the nthu13 label space.
- ``robotcar`` (Oxford RobotCar as HIAST uses it): ``train/<name>.png`` (unlabelled; some
  downloads put them one folder deeper, ``train/<folder>/<name>.png``), ``val/<name>.png``
  and ``anno/<name>.png`` (RGBA, the class id in channel 0), train ids of robotcar9. Every
  raw id not in its table is ignored (reference §11 gives no list of the others), so no id
  is unknown.

Any other file inside those folders is an error; other folders are not read.

Validation collects every problem (a folder or file missing, an unpaired or unexpected
file, an unreadable or corrupt PNG, a label of the wrong format, image/label size
mismatch, label ids outside the dataset's id table) and raises one ``DatasetError``
naming each file. Only then are the lists and statistics written, so a failed run leaves
the previous ones in place.

Outputs under ``out`` (default: the root), read by ``pipeline.data.datasets``:

- ``trainids/<dataset>/<split>/<name>.png``: 8-bit train ids, 255 = ignore;
- ``lists/<dataset>_<split>.txt``: ``name<TAB>image path<TAB>train-id path`` per frame,
  sorted by name (no third field for an unlabeled split);
- ``stats/<dataset>_<split>.parquet``, one row per frame, sorted by name:

  ============== ============ ================================================
  name           string       frame name
  width, height  int32        image size in pixels
  image_sha256   string       digest of the image file (a re-rendered frame changes it)
  class_pixels   list<int64>  pixel count of each train id 0..K-1 of the label space
  ignore_pixels  int64        pixels labelled 255
  ============== ============ ================================================

  (``class_pixels`` and ``ignore_pixels`` are null in an unlabeled split). A label space
  other than Cityscapes-19 is named in the file's schema metadata (``label_space``), which
  the experiment checks against its own.

Every file is written under a temporary name and renamed (object stores: one PUT), and
train-id files of frames no longer listed are removed, so a re-run overwrites cleanly.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from cityscapesscripts.helpers.labels import labels as _CITYSCAPES_LABELS
from PIL import Image
from tqdm import tqdm

from pipeline import storage
from pipeline.data.datasets import (
    JPEG_END,
    NTHU_CITIES,
    PNG_END,
    SPLITS,
    check_dataset,
    list_uri,
    stats_uri,
    trainid_path,
)
from pipeline.labels import CITYSCAPES19, IGNORE_INDEX, SYNTHIA_KNOWN_IDS, LabelSpace, label_space


def _frames(first: int, last: int) -> set[str]:
    return {f"{i:05d}" for i in range(first, last + 1)}


# GTA5 frames left out of every list: the 25 that the released IAST list leaves out
# (data/gtav_train.json in bupt-ai-cz/IAST-ECCV2020, 24,941 of the 24,966 frames).
GTA5_RELEASED_EXCLUDED = frozenset(
    _frames(2154, 2158) | _frames(4634, 4637) | _frames(7115, 7119) | _frames(9683, 9688) | _frames(12050, 12054)
)
# Frames whose label and image sizes differ but which the released list keeps: its loader
# resizes the label to the image with NEAREST (code/sseg/datasets/loader/dataset.py:72-75),
# and so does the conversion here. Any other size mismatch is still an error.
GTA5_RESIZED_LABELS = frozenset({"15188", "17705"})

# Label ids a file may contain: cityscapesScripts' table (ids 0..33; license plate, id
# -1, is never drawn into label-id images) and SYNTHIA's documented class ids.
_CITYSCAPES_KNOWN = np.zeros(256, dtype=bool)
_CITYSCAPES_KNOWN[[lab.id for lab in _CITYSCAPES_LABELS if lab.id >= 0]] = True
_SYNTHIA_KNOWN = np.zeros(65536, dtype=bool)
_SYNTHIA_KNOWN[sorted(SYNTHIA_KNOWN_IDS)] = True

_KNOWN_IDS = {"gta5": _CITYSCAPES_KNOWN, "synthia": _SYNTHIA_KNOWN, "cityscapes": _CITYSCAPES_KNOWN,
              "nthu": _CITYSCAPES_KNOWN, "robotcar": np.ones(256, dtype=bool)}
# The label space a dataset is prepared in unless --label-space says otherwise.
DEFAULT_LABEL_SPACE = {"gta5": "cityscapes19", "synthia": "cityscapes19", "cityscapes": "cityscapes19",
                       "nthu": "nthu13", "robotcar": "robotcar9"}
IMAGE_FORMAT = {"nthu": "JPEG"}  # the others ship PNG

_CITYSCAPES_IGNORED = (
    "_gtFine_color.png",
    "_gtFine_instanceIds.png",
    "_gtFine_polygons.json",
    "_gtFine_labelTrainIds.png",
    "_gtFine_instanceTrainIds.png",
)

_STATS_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image_sha256", pa.string()),
        ("class_pixels", pa.list_(pa.int64())),
        ("ignore_pixels", pa.int64()),
    ]
)


class DatasetError(ValueError):
    """A dataset folder failed validation; ``problems`` names each bad file."""

    def __init__(self, dataset: str, root: str, problems: list[str]):
        self.problems = problems
        lines = [f"{dataset} at {root}: {len(problems)} problem(s)"]
        lines += [f"  {p}" for p in problems]
        lines.append("Fix or remove these files and run again; no list or statistics were written.")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Frame:
    name: str
    image: str  # relative to the dataset root
    label: str | None  # raw label, relative to the dataset root; None when unlabeled


@dataclass(frozen=True)
class Prepared:
    dataset: str
    out: str
    label_space: str
    frames: dict[str, int]  # split -> frames listed
    unlabeled: tuple[str, ...]  # splits prepared without labels
    excluded: tuple[str, ...]  # known-bad frames left out (those of GTA5_RELEASED_EXCLUDED present)


# ---------------------------------------------------------------------------- layout


def _files(root: str, folder: str) -> list[str] | None:
    """Every file under ``root/folder`` as a root-relative path; None if no such folder."""
    fs, path = storage.filesystem(storage.join(root, folder))
    if not fs.isdir(path):
        return None
    base = path.rstrip("/") + "/"
    return sorted(f"{folder}/{p[len(base):]}" for p in fs.find(path))


def _flat_pngs(root: str, folder: str, problems: list[str], suffix: str = ".png") -> dict[str, str] | None:
    """``folder/<name><suffix>`` files by name."""
    files = _files(root, folder)
    if files is None:
        problems.append(f"{folder}/: folder not found")
        return None
    found = {}
    for path in files:
        rel = path[len(folder) + 1:]
        if "/" in rel or not rel.endswith(suffix) or rel == suffix:
            problems.append(f"{path}: unexpected file (expected {folder}/<name>{suffix})")
        else:
            found[rel[: -len(suffix)]] = path
    return found


def _city_files(
    root: str, folder: str, suffix: str, ignored: tuple[str, ...], problems: list[str]
) -> dict[str, str] | None:
    """``folder/<city>/<city>_<seq>_<frame>_<suffix>`` files by name."""
    files = _files(root, folder)
    if files is None:
        return None
    found = {}
    for path in files:
        parts = path[len(folder) + 1:].split("/")
        match = len(parts) == 2 and re.fullmatch(
            rf"({re.escape(parts[0])}_\d+_\d+)_{re.escape(suffix)}", parts[1]
        )
        if match:
            found[match.group(1)] = path
        elif not (len(parts) == 2 and parts[1].endswith(ignored)):
            problems.append(
                f"{path}: unexpected file (expected "
                f"{folder}/<city>/<city>_<seq>_<frame>_{suffix})"
            )
    return found


def _city(name: str) -> str:
    return re.sub(r"_\d+_\d+$", "", name)


def _pair(
    images: dict[str, str], labels: dict[str, str], image_path, label_path, problems
) -> list[Frame]:
    frames = []
    for name in sorted(images.keys() | labels.keys()):
        if name not in labels:
            problems.append(f"{label_path(name)}: missing (label of {images[name]})")
        elif name not in images:
            problems.append(f"{image_path(name)}: missing (image of {labels[name]})")
        else:
            frames.append(Frame(name, images[name], labels[name]))
    return frames


def _scan_nthu(root: str, city: str | None, problems: list[str]) -> dict[str, list[Frame]]:
    if city not in NTHU_CITIES:
        given = "no --city given" if city is None else f"--city {city}: not an NTHU Cross-City city"
        problems.append(f"{given}; give one of {', '.join(NTHU_CITIES)}")
        return {}
    train = _flat_pngs(root, f"{city}/Images/Train", problems, ".jpg")
    test = _flat_pngs(root, f"{city}/Images/Test", problems, ".jpg")
    labels = _flat_pngs(root, f"{city}/Labels/Test", problems, "_eval.png")
    frames = {}
    if train is not None:
        if not train:
            problems.append(f"{city}/Images/Train/: no images")
        frames[f"{city.lower()}_train"] = [Frame(n, train[n], None) for n in sorted(train)]
    if test is not None and labels is not None:
        if not test:
            problems.append(f"{city}/Images/Test/: no images")
        frames[f"{city.lower()}_test"] = _pair(
            test, labels, lambda n: f"{city}/Images/Test/{n}.jpg", lambda n: f"{city}/Labels/Test/{n}_eval.png",
            problems)
    return frames


def _scan_robotcar(root: str, problems: list[str]) -> dict[str, list[Frame]]:
    frames = {}
    train = _files(root, "train")
    if train is None:
        problems.append("train/: folder not found")
    else:
        found: dict[str, str] = {}
        for path in train:
            parts = path.split("/")[1:]
            if len(parts) > 2 or not parts[-1].endswith(".png"):
                problems.append(f"{path}: unexpected file (expected train/<name>.png or train/<folder>/<name>.png)")
            elif parts[-1][:-4] in found:
                problems.append(f"{path}: a second train image named {parts[-1]} (also {found[parts[-1][:-4]]})")
            else:
                found[parts[-1][:-4]] = path
        if not found:
            problems.append("train/: no images")
        frames["train"] = [Frame(n, found[n], None) for n in sorted(found)]
    images, labels = _flat_pngs(root, "val", problems), _flat_pngs(root, "anno", problems)
    if images is not None and labels is not None:
        if not images:
            problems.append("val/: no images")
        frames["val"] = _pair(images, labels, lambda n: f"val/{n}.png", lambda n: f"anno/{n}.png", problems)
    return frames


def scan(dataset: str, root: str, city: str | None = None) -> tuple[dict[str, list[Frame]], tuple[str, ...], list[str]]:
    """Frames of each split, sorted by name; known-bad frames left out; layout problems.
    ``city``: NTHU's city (its splits only)."""
    check_dataset(dataset)
    problems: list[str] = []
    fs, path = storage.filesystem(root)
    if not fs.isdir(path):
        return {}, (), [f"{root}: folder not found"]
    if dataset == "nthu":
        return _scan_nthu(root, city, problems), (), problems
    if dataset == "robotcar":
        return _scan_robotcar(root, problems), (), problems
    if dataset == "cityscapes":
        frames = {}
        for split in SPLITS[dataset]:
            folder = f"leftImg8bit/{split}"
            images = _city_files(root, folder, "leftImg8bit.png", (), problems)
            if images is None:
                problems.append(f"{folder}/: folder not found")
                continue
            if not images:
                problems.append(f"{folder}/: no images")
            labels = _city_files(
                root, f"gtFine/{split}", "gtFine_labelIds.png", _CITYSCAPES_IGNORED, problems
            )
            if labels is None:  # no gtFine/<split>/: an unlabeled split
                frames[split] = [Frame(n, images[n], None) for n in sorted(images)]
                continue
            frames[split] = _pair(
                images,
                labels,
                lambda n: f"{folder}/{_city(n)}/{n}_leftImg8bit.png",
                lambda n: f"gtFine/{split}/{_city(n)}/{n}_gtFine_labelIds.png",
                problems,
            )
        return frames, (), problems

    image_dir, label_dir = ("images", "labels") if dataset == "gta5" else ("RGB", "GT/LABELS")
    images = _flat_pngs(root, image_dir, problems)
    labels = _flat_pngs(root, label_dir, problems)
    if images is None or labels is None:
        return {}, (), problems
    if not images:
        problems.append(f"{image_dir}/: no images")
    excluded: tuple[str, ...] = ()
    if dataset == "gta5":
        excluded = tuple(sorted((images.keys() | labels.keys()) & GTA5_RELEASED_EXCLUDED))
        for name in excluded:
            images.pop(name, None)
            labels.pop(name, None)
    frames = _pair(
        images, labels, lambda n: f"{image_dir}/{n}.png", lambda n: f"{label_dir}/{n}.png", problems
    )
    return {"train": frames}, excluded, problems


# ---------------------------------------------------------------------------- decoding


def _open_png(data: bytes, rel: str, fmt: str = "PNG") -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"{rel}: unreadable or corrupt image ({e})") from None
    if image.format != fmt:
        raise ValueError(f"{rel}: expected a {fmt} file, found {image.format}")
    if not data.endswith({"PNG": PNG_END, "JPEG": JPEG_END}[fmt]):  # cut in its last bytes, it may still decode
        raise ValueError(f"{rel}: unreadable or corrupt image (truncated: no {fmt} end marker); copy it again")
    return image


_IMAGE_MODES = ("RGB", "RGBA", "P", "L")  # 8-bit; what load_image converts to RGB without loss


def _load(image: Image.Image, rel: str) -> Image.Image:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"{rel}: unreadable or corrupt image ({e})") from None
    return image


def read_first_channel16(data: bytes, rel: str) -> np.ndarray:
    """First channel of a 16-bit PNG (gray, RGB or RGBA) as uint16 (H, W).

    Pillow reads a 16-bit colour PNG as 8-bit RGB(A), keeping the high byte of each sample
    (raw mode ``RGB;16B``). Decoding the same stream again with the little-endian raw
    mode (``RGB;16L``) keeps the low byte instead; together they give the exact value.
    8-bit single-channel PNGs are accepted as well.
    """
    image = _open_png(data, rel)
    if image.mode in ("I;16", "I;16B", "L", "P"):
        return np.asarray(_load(image, rel)).astype(np.uint16)
    rawmode = image.tile[0].args if len(image.tile) == 1 else None
    if rawmode not in ("RGB;16B", "RGBA;16B"):
        raise ValueError(
            f"{rel}: expected a 16-bit PNG with the class id in the first channel, got "
            f"mode {image.mode} (raw mode {rawmode}); is this a GT/COLOR image?"
        )
    high = np.asarray(_load(image, rel))[..., 0]
    low_image = _open_png(data, rel)
    low_image.tile = [low_image.tile[0]._replace(args=rawmode[:-1] + "L")]
    low = np.asarray(_load(low_image, rel))[..., 0]
    return (high.astype(np.uint16) << 8) | low


def read_label_ids(dataset: str, data: bytes, rel: str) -> np.ndarray:
    """Raw label ids of a label file (uint8, or uint16 for SYNTHIA)."""
    if dataset == "synthia":
        return read_first_channel16(data, rel)
    if dataset == "robotcar":
        image = _open_png(data, rel)
        if image.mode != "RGBA":
            raise ValueError(f"{rel}: expected an RGBA annotation PNG (class id in channel 0), got mode {image.mode}")
        return np.asarray(_load(image, rel))[..., 0]
    image = _open_png(data, rel)
    if image.mode not in ("L", "P"):
        raise ValueError(
            f"{rel}: expected an 8-bit single-channel label-id PNG, got mode {image.mode}"
            + ("; is this a _color image?" if image.mode in ("RGB", "RGBA") else "")
        )
    return np.asarray(_load(image, rel))


def _ranges(ids: list[int]) -> str:
    """Sorted ids as compact ranges: [0, 1, 2, 5] -> "0..2, 5"."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}..{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)


# ---------------------------------------------------------------------------- one frame


@dataclass
class _Result:
    name: str
    width: int = 0
    height: int = 0
    image_sha256: str | None = None
    class_pixels: list[int] | None = None
    ignore_pixels: int | None = None
    problems: list[str] = field(default_factory=list)


def _read(root: str, rel: str) -> bytes:
    try:
        return storage.read_bytes(storage.join(root, rel))
    except OSError as e:
        raise ValueError(f"{rel}: cannot read ({e})") from None


def _encode_png(label: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # Level 1: train-id maps compress well anyway and level 6 is ~4x slower to write.
    Image.fromarray(label).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _prepare_frame(task: tuple[str, str, str, str, Frame, str]) -> _Result:
    """Check one frame; write its train-id label if it is valid."""
    dataset, root, out, split, frame, space_name = task
    space = label_space(space_name)
    result = _Result(frame.name)
    try:
        data = _read(root, frame.image)
        result.image_sha256 = hashlib.sha256(data).hexdigest()
        image = _load(_open_png(data, frame.image, IMAGE_FORMAT.get(dataset, "PNG")), frame.image)
        result.width, result.height = image.size
        if image.mode not in _IMAGE_MODES:
            raise ValueError(f"{frame.image}: expected an 8-bit RGB image, got mode {image.mode}")
    except ValueError as e:
        result.problems.append(str(e))
    if frame.label is None:
        return result
    try:
        ids = read_label_ids(dataset, _read(root, frame.label), frame.label)
    except ValueError as e:
        result.problems.append(str(e))
        return result
    mismatched = result.width and ids.shape != (result.height, result.width)
    if mismatched and dataset == "gta5" and frame.name in GTA5_RESIZED_LABELS:
        # As the released loader does: the raw ids, NEAREST (the same as resizing the train ids).
        ids = np.asarray(Image.fromarray(ids).resize((result.width, result.height), Image.NEAREST))
    elif mismatched:
        result.problems.append(
            f"{frame.label}: size {ids.shape[1]}x{ids.shape[0]} differs from image "
            f"{frame.image} ({result.width}x{result.height})"
        )
    to_train, known = space.raw_to_train(dataset), _KNOWN_IDS[dataset]
    counts = np.bincount(ids.ravel(), minlength=known.size)
    unknown = np.flatnonzero((counts > 0) & ~known)
    if unknown.size:
        result.problems.append(
            f"{frame.label}: unknown label ids {', '.join(map(str, unknown[:10]))}"
            f"{' ...' if unknown.size > 10 else ''} ({int(counts[unknown].sum())} pixels); "
            f"known ids: {_ranges(np.flatnonzero(known).tolist())}"
        )
    if result.problems:
        return result
    per_train_id = np.bincount(to_train, weights=counts, minlength=256).astype(np.int64)
    result.class_pixels = per_train_id[:space.num_classes].tolist()
    result.ignore_pixels = int(per_train_id[IGNORE_INDEX])
    _write_atomic(
        storage.join(out, trainid_path(dataset, split, frame.name)), _encode_png(to_train[ids])
    )
    return result


# ---------------------------------------------------------------------------- outputs


def _write_atomic(uri: str, data: bytes) -> None:
    """Write under a temporary name, then rename: readers never see half a file."""
    if storage.scheme(uri) != "file":
        storage.write_bytes(uri, data)  # an object PUT is atomic
        return
    os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
    temporary = f"{uri}.tmp{os.getpid()}"
    with open(temporary, "wb") as f:
        f.write(data)
    os.replace(temporary, uri)


def _remove_stale(out: str, dataset: str, split: str, keep: set[str]) -> None:
    """Delete train-id files (and temporaries of a crashed run) no longer listed."""
    fs, path = storage.filesystem(storage.join(out, "trainids", dataset, split))
    if not fs.isdir(path):
        return
    base = path.rstrip("/") + "/"
    stale = [p for p in fs.find(path) if p[len(base):] not in keep]
    if stale:
        fs.rm(stale)


def _write_split(
    dataset: str, out: str, split: str, frames: list[Frame], results: list[_Result], space: LabelSpace,
    label_split: str | None = None,
) -> None:
    """``label_split``: the split whose train-id files the list points at (default: its own)."""
    lines = []
    for frame in frames:
        fields = [frame.name, frame.image]
        if frame.label is not None:
            fields.append(trainid_path(dataset, label_split or split, frame.name))
        lines.append("\t".join(fields) + "\n")
    rows = [
        {
            "name": r.name,
            "width": r.width,
            "height": r.height,
            "image_sha256": r.image_sha256,
            "class_pixels": r.class_pixels,
            "ignore_pixels": r.ignore_pixels,
        }
        for r in results
    ]
    schema = _STATS_SCHEMA
    if space is not CITYSCAPES19:  # Cityscapes-19 leaves it out: its files stay byte-identical to older ones
        schema = schema.with_metadata({"label_space": space.name})
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    _write_atomic(stats_uri(out, dataset, split), buffer.getvalue())
    _write_atomic(list_uri(out, dataset, split), "".join(lines).encode())
    if label_split is None:
        _remove_stale(out, dataset, split, {f"{f.name}.png" for f in frames if f.label is not None})


def _run(tasks: list, workers: int) -> list[_Result]:
    progress = dict(total=len(tasks), desc="prepare", unit="frame", mininterval=1.0)
    if workers == 1 or len(tasks) < 2:
        return list(tqdm(map(_prepare_frame, tasks), **progress))
    workers = min(workers, len(tasks))
    chunksize = max(1, min(64, len(tasks) // (4 * workers)))
    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(_prepare_frame, tasks, chunksize=chunksize), **progress))


def default_out(dataset: str, root: str, space: str) -> str:
    """Where a dataset's preparation goes by default: the root, or ``<root>/prepared_<space>``
    for a label space other than the dataset's own (so that the two never overwrite each other)."""
    return root if space == DEFAULT_LABEL_SPACE[dataset] else storage.join(root, f"prepared_{space}")


# ---------------------------------------------------------------------------- semi-supervised

# The seed of the one permutation of Cityscapes train that every semi-supervised split takes
# its first N frames of (so 1/8 is inside 1/4, inside 1/2, as in ClassMix's protocol). The
# order is written (lists/cityscapes_train_order.txt) and reused, never drawn again.
SEMI_SEED = 0


def semi_tag(semi: str) -> str:
    """The split suffix of a --semi value: "1/8" -> "1-8", "372" -> "372"."""
    return semi.replace("/", "-")


def semi_count(semi: str, total: int) -> int:
    """How many train frames a --semi value labels: a fraction (rounded up, as 372 of 2,975
    for 1/8) or a count. Raises ValueError naming the fix."""
    try:
        value = Fraction(semi)
    except (ValueError, ZeroDivisionError):
        value = None
    if value is None or value <= 0 or ("/" in semi and value >= 1) or ("/" not in semi and value.denominator != 1):
        raise ValueError(f"--semi {semi}: give a fraction below 1 (1/8, 1/4, 1/2) or a number of frames (372)")
    count = math.ceil(value * total) if "/" in semi else int(value)
    if not 1 <= count < total:
        raise ValueError(f"--semi {semi}: labels {count} of the {total} train frames; at least one frame must be "
                         "labelled and one left unlabelled")
    return count


def _semi_order(out: str, names: list[str], problems: list[str]) -> tuple[list[str], bool]:
    """The fixed order of the train frames (and whether it is new): read, or drawn once."""
    uri = storage.join(out, "lists", "cityscapes_train_order.txt")
    if storage.exists(uri):
        order = storage.read_bytes(uri).decode().split()
        if sorted(order) != names:
            problems.append(f"{uri}: holds {len(set(order) - set(names))} frame(s) not in train and misses "
                            f"{len(set(names) - set(order))}; delete it to draw a new order (a new split)")
        return order, False
    return [names[i] for i in np.random.default_rng(SEMI_SEED).permutation(len(names))], True


def _write_semi(out: str, semi: str, order: list[str], new_order: bool, frames: list[Frame],
                results: list[_Result], space: LabelSpace) -> dict[str, int]:
    labeled = set(order[:semi_count(semi, len(order))])
    if new_order:
        _write_atomic(storage.join(out, "lists", "cityscapes_train_order.txt"), "".join(f"{n}\n" for n in order).encode())
    counts = {}
    for kind, keep in (("labeled", True), ("unlabeled", False)):
        split = f"train_{kind}_{semi_tag(semi)}"
        chosen = [(f, r) for f, r in zip(frames, results) if (f.name in labeled) == keep]
        _write_split("cityscapes", out, split, [f for f, _ in chosen], [r for _, r in chosen], space, "train")
        counts[split] = len(chosen)
    return counts


def prepare(dataset: str, root: str, out: str | None = None, workers: int | None = None,
            space: str | None = None, semi: str | None = None, city: str | None = None) -> Prepared:
    """Validate ``root`` as ``dataset``; write train-id labels, lists and statistics to ``out``.

    ``space``: the label space the train ids are in (default: the dataset's own; another,
    e.g. Cityscapes in nthu13, is written to ``default_out`` unless ``out`` is given).
    ``semi`` (Cityscapes): also split train into ``train_labeled_<tag>`` (its first
    ``semi_count`` frames in the fixed order of ``SEMI_SEED``) and ``train_unlabeled_<tag>``
    (the rest; its list keeps the label paths, read only for pseudo-label statistics, as any
    target's labels are). ``city``: NTHU's city to prepare (Rome, Rio, Tokyo, Taipei).
    Raises ``DatasetError`` listing every problem found (nothing but the train-id files
    of valid frames is written then).
    """
    check_dataset(dataset)
    space = label_space(space or DEFAULT_LABEL_SPACE[dataset])
    space.raw_to_train(dataset)  # raises if the dataset's labels do not map into the space
    storage.check_uri(root)
    out = storage.check_uri(out or default_out(dataset, root, space.name))
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if semi is not None and dataset != "cityscapes":
        raise ValueError(f"--semi splits Cityscapes train, not {dataset}")
    if city is not None and dataset != "nthu":
        raise ValueError(f"--city selects an NTHU Cross-City city, not a part of {dataset}")
    frames, excluded, problems = scan(dataset, root, city)
    if semi is not None:
        train = frames.get("train", [])
        if any(f.label is None for f in train):
            problems.append("gtFine/train/: folder not found (a semi-supervised split needs train's labels)")
        try:
            semi_count(semi, len(train))
        except ValueError as err:
            problems.append(str(err))
        order, new_order = _semi_order(out, sorted(f.name for f in train), problems)
    tasks = [(dataset, root, out, split, f, space.name) for split in frames for f in frames[split]]
    results = _run(tasks, workers)
    problems += [p for r in results for p in r.problems]
    if problems:
        raise DatasetError(dataset, root, sorted(problems))

    by_split: dict[str, list[_Result]] = {split: [] for split in frames}
    for (_, _, _, split, _, _), result in zip(tasks, results):
        by_split[split].append(result)
    for split in frames:
        _write_split(dataset, out, split, frames[split], by_split[split], space)
    counts = {split: len(frames[split]) for split in frames}
    if semi is not None:
        counts.update(_write_semi(out, semi, order, new_order, frames["train"], by_split["train"], space))
    return Prepared(
        dataset=dataset,
        out=out,
        label_space=space.name,
        frames=counts,
        unlabeled=tuple(s for s in frames if any(f.label is None for f in frames[s])),
        excluded=excluded,
    )
