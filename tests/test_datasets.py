"""Readers of the prepared datasets: sample lists, images, train-id labels, torch Dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.datasets import (
    Sample,
    SegmentationDataset,
    list_samples,
    load_image,
    load_label,
)
from pipeline.data.prepare import prepare
from pipeline.labels import GTA5_ID_TO_TRAIN

RNG = np.random.default_rng(1)


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_gta5(root: Path, names: list[str], size=(6, 8)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (image, raw label ids) in the GTA5 layout."""
    frames = {}
    for name in names:
        image = RNG.integers(0, 256, (*size, 3), dtype=np.uint8)
        ids = RNG.choice(np.array([0, 7, 8, 11, 21, 23, 24, 26, 33], np.uint8), size=size)
        save(root / "images" / f"{name}.png", image)
        save(root / "labels" / f"{name}.png", ids)
        frames[name] = image, ids
    return frames


def test_load_image(tmp_path):
    rgb = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = load_image(str(save(tmp_path / "rgb.png", rgb)))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, rgb)

    gray = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(str(save(tmp_path / "gray.png", gray))), np.stack([gray] * 3, -1))


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.png: file not found"):
        load_image(str(tmp_path / "missing.png"))
    data = save(tmp_path / "cut.png", RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8)).read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.png: unreadable or corrupt image"):
        load_image(str(tmp_path / "cut.png"))


def test_load_label(tmp_path):
    label = np.array([[0, 18, 255], [3, 255, 7]], dtype=np.uint8)
    out = load_label(str(save(tmp_path / "ok.png", label)))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, label)

    with pytest.raises(ValueError, match=r"raw\.png: values \[19, 33\] are not train ids"):
        load_label(str(save(tmp_path / "raw.png", np.array([[19, 33, 0]], np.uint8))))
    with pytest.raises(ValueError, match=r"color\.png: expected an 8-bit single-channel"):
        load_label(str(save(tmp_path / "color.png", np.zeros((2, 2, 3), np.uint8))))


def test_list_samples_reads_prepared_lists(tmp_path):
    root, out = tmp_path / "gta5", tmp_path / "prepared"
    with pytest.raises(FileNotFoundError, match="run `python jobs/prepare_data.py --dataset gta5"):
        list_samples("gta5", str(root), "train", str(out))

    frames = make_gta5(root, ["00003", "00001", "00002"])
    prepare("gta5", str(root), str(out), workers=1)
    samples = list_samples("gta5", str(root), "train", str(out))

    assert samples == [
        Sample(n, str(root / "images" / f"{n}.png"), str(out / "trainids" / "gta5" / "train" / f"{n}.png"))
        for n in ("00001", "00002", "00003")
    ]
    for sample in samples:
        image, ids = frames[sample.name]
        np.testing.assert_array_equal(load_image(sample.image), image)
        np.testing.assert_array_equal(load_label(sample.label), GTA5_ID_TO_TRAIN[ids])

    with pytest.raises(ValueError, match="gta5 has no split 'val'"):
        list_samples("gta5", str(root), "val", str(out))
    with pytest.raises(ValueError, match="unknown dataset 'kitti'"):
        list_samples("kitti", str(root), "train")
    (out / "lists" / "gta5_train.txt").write_text("00001 images/00001.png\n")
    with pytest.raises(ValueError, match=r"gta5_train\.txt line 1: expected name, image"):
        list_samples("gta5", str(root), "train", str(out))


def test_segmentation_dataset(tmp_path):
    root = tmp_path / "gta5"
    frames = make_gta5(root, ["00001", "00002"])
    prepare("gta5", str(root), workers=1)
    samples = list_samples("gta5", str(root), "train")
    unlabeled = Sample("x", samples[0].image, None)

    dataset = SegmentationDataset(samples + [unlabeled])
    assert len(dataset) == 3
    image, label = dataset[1]
    np.testing.assert_array_equal(image, frames["00002"][0])
    np.testing.assert_array_equal(label, GTA5_ID_TO_TRAIN[frames["00002"][1]])
    image, label = dataset[2]
    assert label.shape == (6, 8) and (label == 255).all()

    def flip(image, label):
        return image[:, ::-1].copy(), label[:, ::-1].copy()

    images, labels = next(iter(torch.utils.data.DataLoader(SegmentationDataset(samples, flip), batch_size=2)))
    assert images.shape == (2, 6, 8, 3) and images.dtype == torch.uint8
    np.testing.assert_array_equal(labels[0].numpy(), GTA5_ID_TO_TRAIN[frames["00001"][1]][:, ::-1])


def test_segmentation_dataset_size_mismatch_names_both_files(tmp_path):
    image = save(tmp_path / "i.png", np.zeros((4, 4, 3), np.uint8))
    label = save(tmp_path / "l.png", np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"l\.png: label is 5x4 but image .*i\.png is 4x4"):
        SegmentationDataset([Sample("a", str(image), str(label))])[0]


def test_data_config_makes_local_paths_absolute_and_keeps_uris(tmp_path, monkeypatch):
    from pipeline.data.datasets import DataConfig

    monkeypatch.chdir(tmp_path)
    local = DataConfig("cityscapes", "data/cs", "val", prepared="prep")
    assert local.root == str(tmp_path / "data" / "cs") and local.prepared == str(tmp_path / "prep")
    assert DataConfig("gta5", "s3://bucket/gta5").root == "s3://bucket/gta5"


def test_fingerprint_follows_the_prepared_contents_not_the_run(tmp_path):
    from pipeline.data.datasets import DataConfig

    root = tmp_path / "gta5"
    frames = make_gta5(root, ["00001", "00002"])
    prepare("gta5", str(root), workers=1)
    data = DataConfig("gta5", str(root))
    before = data.fingerprint()
    prepare("gta5", str(root), workers=1)
    assert data.fingerprint() == before  # the same frames prepared again

    image, _ = frames["00002"]
    save(root / "images" / "00002.png", 255 - image)  # one frame re-rendered, same size and label
    prepare("gta5", str(root), workers=1)
    rerendered = data.fingerprint()
    assert rerendered != before

    _, ids = frames["00001"]
    save(root / "labels" / "00001.png", np.where(ids == 7, 8, ids).astype(np.uint8))  # one frame relabelled
    prepare("gta5", str(root), workers=1)
    assert data.fingerprint() not in (before, rerendered)
