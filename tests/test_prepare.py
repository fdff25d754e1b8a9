"""Dataset validation and preparation on tiny fixtures in the official on-disk layouts."""

from __future__ import annotations

import hashlib
import runpy
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.datasets import list_samples, load_label
from pipeline.data.prepare import (
    GTA5_RELEASED_EXCLUDED,
    GTA5_RESIZED_LABELS,
    DatasetError,
    prepare,
    read_first_channel16,
)
from pipeline.labels import (
    CITYSCAPES_ID_TO_TRAIN,
    GTA5_ID_TO_TRAIN,
    NUM_CLASSES,
    SYNTHIA_ID_TO_TRAIN,
)

REPO = Path(__file__).resolve().parents[1]
main = runpy.run_path(str(REPO / "jobs" / "prepare_data.py"))["main"]
RNG = np.random.default_rng(0)
CITYSCAPES_IDS = np.array([0, 1, 4, 7, 8, 11, 13, 17, 21, 23, 24, 26, 28, 33], dtype=np.uint8)
SYNTHIA_IDS = np.arange(0, 23, dtype=np.uint16)


# ---------------------------------------------------------------------------- writers


def write_png16(path: Path, array: np.ndarray, filters=(0, 1, 2, 3, 4)) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour), cycling through
    the five PNG row filters so the decoder's unfiltering is exercised."""
    a = np.asarray(array, dtype=np.uint16)
    channels = 1 if a.ndim == 2 else a.shape[2]
    height, width = a.shape[:2]
    rows = a.astype(">u2").reshape(height, -1).view(np.uint8).reshape(height, -1).astype(np.int32)
    bpp = 2 * channels
    out = bytearray()
    prior = np.zeros_like(rows[0])
    for y, raw in enumerate(rows):
        kind = filters[y % len(filters)]
        left = np.concatenate([np.zeros(bpp, np.int32), raw[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), prior[:-bpp]])
        if kind == 0:
            predictor = np.zeros_like(raw)
        elif kind == 1:
            predictor = left
        elif kind == 2:
            predictor = prior
        elif kind == 3:
            predictor = (left + prior) // 2
        else:
            p = left + prior - upleft
            pa, pb, pc = abs(p - left), abs(p - prior), abs(p - upleft)
            predictor = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prior, upleft))
        out.append(kind)
        out += ((raw - predictor) % 256).astype(np.uint8).tobytes()
        prior = raw

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    color_type = {1: 0, 3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(out)))
        + chunk(b"IEND", b"")
    )


def write_rgb(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def write_ids(path: Path, ids: np.ndarray, palette: bool = False) -> None:
    """8-bit label-id PNG: GTA5 ships palette (P) images, Cityscapes grayscale (L)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(ids.astype(np.uint8))
    if palette:
        image = image.convert("P")
        image.putpalette(RNG.integers(0, 256, 768, dtype=np.uint8).tobytes())
    image.save(path)


def random_ids(choices: np.ndarray, height: int = 6, width: int = 8) -> np.ndarray:
    return RNG.choice(choices, size=(height, width))


def make_gta5(root: Path, names=("00001", "00002", "00003"), size=(6, 8)) -> dict[str, np.ndarray]:
    labels = {}
    for name in names:
        labels[name] = random_ids(CITYSCAPES_IDS, *size)
        write_rgb(root / "images" / f"{name}.png", *size)
        write_ids(root / "labels" / f"{name}.png", labels[name], palette=True)
    return labels


def make_cityscapes(root: Path, frames: dict[str, list[str]], size=(4, 8)) -> dict[str, np.ndarray]:
    """frames: split -> names like "aachen_000000_000019"."""
    labels = {}
    for split, names in frames.items():
        for name in names:
            city = name.rsplit("_", 2)[0]
            write_rgb(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", *size)
            gt = root / "gtFine" / split / city
            labels[name] = random_ids(CITYSCAPES_IDS, *size)
            write_ids(gt / f"{name}_gtFine_labelIds.png", labels[name])
            write_ids(gt / f"{name}_gtFine_instanceIds.png", labels[name])
            write_rgb(gt / f"{name}_gtFine_color.png", *size)
            (gt / f"{name}_gtFine_polygons.json").write_text("{}")
    return labels


def read_list(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------- 16-bit PNG


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_read_first_channel16_is_exact_for_every_filter(tmp_path, channels):
    shape = (7, 9) if channels == 1 else (7, 9, channels)
    values = RNG.integers(0, 65536, shape, dtype=np.uint16)
    write_png16(tmp_path / "x.png", values)
    first = values if channels == 1 else values[..., 0]
    decoded = read_first_channel16((tmp_path / "x.png").read_bytes(), "x.png")
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, first)


def test_read_first_channel16_rejects_8bit_colour(tmp_path):
    write_rgb(tmp_path / "c.png", 3, 3)
    with pytest.raises(ValueError, match=r"c\.png: expected a 16-bit PNG"):
        read_first_channel16((tmp_path / "c.png").read_bytes(), "c.png")


# ---------------------------------------------------------------------------- GTA5


def test_gta5_excludes_exactly_the_frames_the_released_list_leaves_out():
    # data/gtav_train.json of the released code lists 24,941 of the 24,966 frames.
    ranges = [(2154, 2158), (4634, 4637), (7115, 7119), (9683, 9688), (12050, 12054)]
    assert GTA5_RELEASED_EXCLUDED == {f"{i:05d}" for a, b in ranges for i in range(a, b + 1)}
    assert len(GTA5_RELEASED_EXCLUDED) == 25 and 24966 - 25 == 24941
    assert {"02154", "02158", "09688", "12054"} <= GTA5_RELEASED_EXCLUDED
    assert not {"02153", "02159", "09689", "15188", "17705"} & GTA5_RELEASED_EXCLUDED
    assert GTA5_RESIZED_LABELS == {"15188", "17705"}  # kept, their labels resized


def test_gta5_train_ids_lists_stats_and_bad_frames(tmp_path):
    root = tmp_path / "gta5"
    labels = make_gta5(root, names=("00001", "00002", "00003", "17705"))
    # Frames the released list leaves out: one with a label of another size, one without a label.
    write_rgb(root / "images" / "02154.png", 6, 8)
    write_ids(root / "labels" / "02154.png", random_ids(CITYSCAPES_IDS, 5, 5))
    write_rgb(root / "images" / "12054.png", 6, 8)
    # Kept although its label is half the image's size: the label is resized, NEAREST.
    small = random_ids(CITYSCAPES_IDS, 3, 4)
    write_rgb(root / "images" / "15188.png", 6, 8)
    write_ids(root / "labels" / "15188.png", small, palette=True)
    labels["15188"] = small.repeat(2, axis=0).repeat(2, axis=1)
    kept = ("00001", "00002", "00003", "15188", "17705")

    result = prepare("gta5", str(root), workers=2)

    assert result.frames == {"train": 5}
    assert result.excluded == ("02154", "12054")
    lines = read_list(root / "lists" / "gta5_train.txt")
    assert lines == [[n, f"images/{n}.png", f"trainids/gta5/train/{n}.png"] for n in kept]
    for name, ids in labels.items():
        written = Image.open(root / "trainids" / "gta5" / "train" / f"{name}.png")
        assert written.mode == "L" and written.size == (8, 6)  # the image's size, 15188 too
        np.testing.assert_array_equal(np.asarray(written), GTA5_ID_TO_TRAIN[ids])
    stats = pq.read_table(root / "stats" / "gta5_train.parquet").to_pylist()
    assert [row["name"] for row in stats] == list(kept)
    for row in stats:
        train = GTA5_ID_TO_TRAIN[labels[row["name"]]]
        counts = np.bincount(train.ravel(), minlength=256)
        assert (row["width"], row["height"]) == (8, 6)
        assert row["image_sha256"] == hashlib.sha256((root / "images" / f"{row['name']}.png").read_bytes()).hexdigest()
        assert row["class_pixels"] == counts[:NUM_CLASSES].tolist()
        assert row["ignore_pixels"] == counts[255]
        assert sum(row["class_pixels"]) + row["ignore_pixels"] == 48


def test_gta5_label_of_another_size_is_an_error_outside_the_released_exceptions(tmp_path):
    root = tmp_path / "gta5"
    make_gta5(root, names=("00001",))
    for name in ("15187", "15188"):
        write_rgb(root / "images" / f"{name}.png", 6, 8)
        write_ids(root / "labels" / f"{name}.png", random_ids(CITYSCAPES_IDS, 3, 4))
    with pytest.raises(DatasetError) as error:
        prepare("gta5", str(root), workers=1)
    assert error.value.problems == ["labels/15187.png: size 4x3 differs from image images/15187.png (8x6)"]


# ---------------------------------------------------------------------------- SYNTHIA


def test_synthia_16bit_labels(tmp_path):
    root = tmp_path / "synthia"
    ids = {}
    for name, channels in (("0000000", 3), ("0000001", 4), ("0000002", 1)):
        write_rgb(root / "RGB" / f"{name}.png", 5, 7)
        ids[name] = random_ids(SYNTHIA_IDS, 5, 7)
        if channels == 1:
            label = ids[name]
        else:
            # Other channels hold large values (instance ids) that must not leak in.
            label = RNG.integers(0, 65536, (5, 7, channels), dtype=np.uint16)
            label[..., 0] = ids[name]
        write_png16(root / "GT" / "LABELS" / f"{name}.png", label)
    write_rgb(root / "GT" / "COLOR" / "0000000.png", 5, 7)  # not read

    prepare("synthia", str(root), workers=1)

    samples = list_samples("synthia", str(root), "train")
    assert [s.name for s in samples] == sorted(ids)
    for sample in samples:
        np.testing.assert_array_equal(load_label(sample.label), SYNTHIA_ID_TO_TRAIN[ids[sample.name]])


def test_synthia_problems(tmp_path):
    root = tmp_path / "synthia"
    for name in ("0000000", "0000001", "0000002"):
        write_rgb(root / "RGB" / f"{name}.png", 4, 4)
    write_png16(root / "GT" / "LABELS" / "0000000.png", np.full((4, 4, 3), 23, np.uint16))
    write_png16(root / "GT" / "LABELS" / "0000001.png", np.full((4, 4, 3), 256 + 3, np.uint16))
    write_rgb(root / "GT" / "LABELS" / "0000002.png", 4, 4)  # a colour image, not ids
    with pytest.raises(DatasetError) as error:
        prepare("synthia", str(root), workers=1)
    problems = error.value.problems
    assert len(problems) == 3
    assert "GT/LABELS/0000000.png: unknown label ids 23 " in problems[0]
    assert "known ids: 0..22" in problems[0]
    assert "GT/LABELS/0000001.png: unknown label ids 259 " in problems[1]
    assert problems[2].startswith("GT/LABELS/0000002.png: expected a 16-bit PNG")


# ---------------------------------------------------------------------------- Cityscapes


def test_cityscapes_splits(tmp_path):
    root, out = tmp_path / "cityscapes", tmp_path / "prepared"
    frames = {
        "train": ["synthcity_000001_000019", "aachen_000000_000019", "aachen_000000_000001"],
        "val": ["frankfurt_000000_000294"],
    }
    labels = make_cityscapes(root, frames)
    write_ids(root / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png",
              np.zeros((4, 8)))
    (root / "leftImg8bit" / "test" / "berlin").mkdir(parents=True)
    (root / "leftImg8bit" / "test" / "berlin" / "anything.txt").write_text("not read")

    result = prepare("cityscapes", str(root), str(out), workers=1)

    assert result.frames == {"train": 3, "val": 1} and result.unlabeled == ()
    assert read_list(out / "lists" / "cityscapes_train.txt") == [
        [n, f"leftImg8bit/train/{n.rsplit('_', 2)[0]}/{n}_leftImg8bit.png",
         f"trainids/cityscapes/train/{n}.png"]
        for n in sorted(frames["train"])
    ]
    val = list_samples("cityscapes", str(root), "val", str(out))
    assert [s.name for s in val] == ["frankfurt_000000_000294"]
    np.testing.assert_array_equal(
        load_label(val[0].label), CITYSCAPES_ID_TO_TRAIN[labels["frankfurt_000000_000294"]]
    )
    assert not (root / "lists").exists()  # --out keeps the dataset folder untouched


def test_cityscapes_split_without_gtfine_is_unlabeled(tmp_path):
    root = tmp_path / "cityscapes"
    make_cityscapes(root, {"train": ["synthcity_000000_000000"], "val": ["synthcity_000000_000001"]})
    for path in sorted((root / "gtFine" / "train").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "gtFine" / "train").rmdir()

    result = prepare("cityscapes", str(root), workers=1)

    assert result.unlabeled == ("train",)
    (train,) = list_samples("cityscapes", str(root), "train")
    assert train.label is None and train.image.endswith("synthcity_000000_000000_leftImg8bit.png")
    (row,) = pq.read_table(root / "stats" / "cityscapes_train.parquet").to_pylist()
    image = root / "leftImg8bit" / "train" / "synthcity" / "synthcity_000000_000000_leftImg8bit.png"
    assert row == {"name": "synthcity_000000_000000", "width": 8, "height": 4,
                   "image_sha256": hashlib.sha256(image.read_bytes()).hexdigest(),
                   "class_pixels": None, "ignore_pixels": None}
    assert list_samples("cityscapes", str(root), "val")[0].label is not None


# ---------------------------------------------------------------------------- bad input


def test_every_problem_is_reported_naming_its_file(tmp_path):
    root = tmp_path / "gta5"
    make_gta5(root, names=("00001", "00004", "00005", "00006", "00007", "00008"))
    write_rgb(root / "images" / "00002.png", 6, 8)  # no label
    write_ids(root / "labels" / "00003.png", random_ids(CITYSCAPES_IDS))  # no image
    (root / "images" / "notes.txt").write_text("extra")
    write_ids(root / "labels" / "sub" / "00009.png", random_ids(CITYSCAPES_IDS))
    write_ids(root / "labels" / "00004.png", random_ids(CITYSCAPES_IDS, 6, 9))  # size mismatch
    bad_ids = random_ids(CITYSCAPES_IDS)
    bad_ids[0, :2] = [40, 250]
    write_ids(root / "labels" / "00005.png", bad_ids)  # ids outside the table
    truncated = (root / "images" / "00006.png").read_bytes()
    (root / "images" / "00006.png").write_bytes(truncated[: len(truncated) // 2])
    (root / "labels" / "00007.png").write_bytes(b"not a png at all")
    write_rgb(root / "labels" / "00008.png", 6, 8)  # a colour image instead of ids

    with pytest.raises(DatasetError) as error:
        prepare("gta5", str(root), workers=2)

    problems = error.value.problems
    expected = [
        "images/00003.png: missing (image of labels/00003.png)",
        "images/00006.png: unreadable or corrupt image",
        "images/notes.txt: unexpected file",
        "labels/00002.png: missing (label of images/00002.png)",
        "labels/00004.png: size 9x6 differs from image images/00004.png (8x6)",
        "labels/00005.png: unknown label ids 40, 250 (2 pixels); known ids: 0..33",
        "labels/00007.png: unreadable or corrupt image",
        "labels/00008.png: expected an 8-bit single-channel label-id PNG, got mode RGB",
        "labels/sub/00009.png: unexpected file",
    ]
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected):
        assert problem.startswith(start)
    assert str(error.value).startswith(f"gta5 at {root}: 9 problem(s)\n")
    assert not (root / "lists").exists() and not (root / "stats").exists()


def test_cityscapes_unpaired_and_misplaced_files(tmp_path):
    root = tmp_path / "cityscapes"
    make_cityscapes(root, {"train": ["aachen_000000_000001", "aachen_000000_000002"],
                           "val": ["lindau_000000_000001"]})
    (root / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000002_leftImg8bit.png").unlink()
    (root / "gtFine" / "val" / "lindau" / "lindau_000000_000001_gtFine_labelIds.png").unlink()
    write_rgb(root / "leftImg8bit" / "train" / "aachen" / "bochum_000000_000001_leftImg8bit.png", 4, 8)
    write_rgb(root / "leftImg8bit" / "train" / "loose_leftImg8bit.png", 4, 8)

    with pytest.raises(DatasetError) as error:
        prepare("cityscapes", str(root), workers=1)

    problems = error.value.problems
    assert len(problems) == 4
    assert problems[0].startswith(
        "gtFine/val/lindau/lindau_000000_000001_gtFine_labelIds.png: missing (label of "
        "leftImg8bit/val/lindau/lindau_000000_000001_leftImg8bit.png)"
    )
    assert problems[1].startswith(
        "leftImg8bit/train/aachen/aachen_000000_000002_leftImg8bit.png: missing (image of "
        "gtFine/train/aachen/aachen_000000_000002_gtFine_labelIds.png)"
    )
    assert problems[2].startswith(
        "leftImg8bit/train/aachen/bochum_000000_000001_leftImg8bit.png: unexpected file"
    )
    assert problems[3].startswith("leftImg8bit/train/loose_leftImg8bit.png: unexpected file")


def test_missing_folders(tmp_path):
    (tmp_path / "gta5" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError) as error:
        prepare("gta5", str(tmp_path / "gta5"), workers=1)
    assert error.value.problems == ["labels/: folder not found"]
    with pytest.raises(DatasetError) as error:
        prepare("synthia", str(tmp_path / "nowhere"), workers=1)
    assert error.value.problems == [f"{tmp_path / 'nowhere'}: folder not found"]


# ---------------------------------------------------------------------------- re-runs


def test_rerun_overwrites_cleanly(tmp_path):
    root = tmp_path / "gta5"
    make_gta5(root)
    prepare("gta5", str(root), workers=1)
    trainids = root / "trainids" / "gta5" / "train"
    (trainids / "00002.png.tmp123").write_bytes(b"left by a crashed run")

    for path in (root / "images" / "00003.png", root / "labels" / "00003.png"):
        path.unlink()
    new_ids = random_ids(CITYSCAPES_IDS)
    write_ids(root / "labels" / "00001.png", new_ids, palette=True)
    prepare("gta5", str(root), workers=1)

    assert sorted(p.name for p in trainids.iterdir()) == ["00001.png", "00002.png"]
    assert [line[0] for line in read_list(root / "lists" / "gta5_train.txt")] == ["00001", "00002"]
    np.testing.assert_array_equal(load_label(str(trainids / "00001.png")), GTA5_ID_TO_TRAIN[new_ids])
    assert pq.read_table(root / "stats" / "gta5_train.parquet").num_rows == 2

    # A failing run leaves the last good lists in place.
    (root / "labels" / "00002.png").unlink()
    with pytest.raises(DatasetError):
        prepare("gta5", str(root), workers=1)
    assert [line[0] for line in read_list(root / "lists" / "gta5_train.txt")] == ["00001", "00002"]
    assert not [p for p in root.rglob("*") if ".tmp" in p.name]


# ---------------------------------------------------------------------------- command line


def test_cli_exit_status_and_report(tmp_path, capsys):
    root = tmp_path / "gta5"
    make_gta5(root, names=("00001",))
    assert main(["--dataset", "gta5", "--root", str(root), "--workers", "1"]) == 0
    assert "gta5 train: 1 frames" in capsys.readouterr().out

    (root / "labels" / "00001.png").unlink()
    assert main(["--dataset", "gta5", "--root", str(root), "--workers", "1"]) == 1
    assert "labels/00001.png: missing (label of images/00001.png)" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["--dataset", "gta5", "--root", str(root), "--workers", "0"])


def test_cli_runs_as_a_script(tmp_path):
    root = tmp_path / "gta5"
    make_gta5(root, names=("00001", "04634"))
    done = subprocess.run(
        [sys.executable, "jobs/prepare_data.py", "--dataset", "gta5", "--root", str(root),
         "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "1 known-bad frame(s) excluded: 04634" in done.stdout
    assert (tmp_path / "out" / "lists" / "gta5_train.txt").read_text().startswith("00001\t")
