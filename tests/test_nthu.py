"""NTHU Cross-City: conversion of the official layout (JPEG images, Cityscapes label ids in
``_eval.png``), every bad input in one report, and a tiny Cityscapes -> city round in the
13 classes."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import config
from pipeline.data.datasets import list_samples, load_label
from pipeline.data.prepare import DatasetError, prepare
from pipeline.experiment import ExperimentConfig
from pipeline.label_store import LabelStore
from pipeline.labels import NTHU13
from pipeline.rounds import run_experiment
from pipeline.tracking import ExperimentTracker, default_tracking_uri

REPO = Path(__file__).resolve().parents[1]
main = runpy.run_path(str(REPO / "jobs" / "prepare_data.py"))["main"]
# Cityscapes label ids as NTHU's _eval.png hold them: 13 kept classes, and wall (12),
# terrain (22), truck (27), unlabeled (0) that the 13 classes drop.
IDS = np.array([7, 8, 11, 19, 20, 21, 23, 24, 25, 26, 28, 32, 33, 12, 22, 27, 0], np.uint8)
RNG = np.random.default_rng(2)


def write_jpg(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, format="JPEG")


def write_city(root: Path, city: str, train: int = 3, test: int = 2, size=(32, 64)) -> dict[str, np.ndarray]:
    """<City>/Images/{Train,Test}/<id>.jpg and <City>/Labels/Test/<id>_eval.png."""
    labels = {}
    for i in range(train):
        write_jpg(root / city / "Images" / "Train" / f"pano_{i:05d}_0_0.jpg", *size)
    for i in range(test):
        name = f"pano_{100 + i:05d}_2_180"
        write_jpg(root / city / "Images" / "Test" / f"{name}.jpg", *size)
        labels[name] = RNG.choice(IDS, size)
        labels[name][0, : len(IDS)] = IDS  # every id present
        (root / city / "Labels" / "Test").mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels[name]).save(root / city / "Labels" / "Test" / f"{name}_eval.png")
    return labels


def test_a_city_is_converted_to_the_13_classes(tmp_path):
    labels = write_city(tmp_path, "Rome")
    write_city(tmp_path, "Tokyo")  # another city on disk is not read
    assert main(["--dataset", "nthu", "--root", str(tmp_path), "--city", "Rome", "--workers", "1"]) == 0
    train = list_samples("nthu", str(tmp_path), "rome_train")
    assert [s.name for s in train] == [f"pano_{i:05d}_0_0" for i in range(3)]
    assert all(s.label is None and s.image.endswith(".jpg") for s in train)  # the unlabelled target
    test = list_samples("nthu", str(tmp_path), "rome_test")
    assert [s.name for s in test] == sorted(labels)
    table = NTHU13.raw_to_train("nthu")
    for sample in test:
        assert sample.label == f"{tmp_path}/trainids/nthu/rome_test/{sample.name}.png"
        written = load_label(sample.label)
        np.testing.assert_array_equal(written, table[labels[sample.name]])
        assert set(np.unique(written)) == set(range(13)) | {255}
    stats = pq.read_table(tmp_path / "stats" / "nthu_rome_test.parquet")
    assert stats.schema.metadata == {b"label_space": b"nthu13"}
    first = labels[sorted(labels)[0]]
    assert stats["class_pixels"][0].as_py() == np.bincount(table[first].ravel(), minlength=256)[:13].tolist()
    assert stats["ignore_pixels"][0].as_py() == int(np.isin(first, [12, 22, 27, 0]).sum())
    assert stats["width"][0].as_py() == 64 and stats["height"][0].as_py() == 32
    assert not (tmp_path / "lists" / "nthu_tokyo_train.txt").exists()


def test_every_bad_input_is_reported_in_one_list_before_writing(tmp_path):
    labels = write_city(tmp_path, "Rome", train=2, test=4)
    test_dir, label_dir = tmp_path / "Rome" / "Images" / "Test", tmp_path / "Rome" / "Labels" / "Test"
    names = sorted(labels)
    (label_dir / f"{names[0]}_eval.png").unlink()  # an image without its label
    (test_dir / f"{names[1]}.jpg").unlink()  # a label without its image
    bad_ids = labels[names[2]].copy()
    bad_ids[0, 0] = 40
    Image.fromarray(bad_ids).save(label_dir / f"{names[2]}_eval.png")  # an id outside the table
    Image.fromarray(labels[names[3]][:16]).save(label_dir / f"{names[3]}_eval.png")  # another size
    (tmp_path / "Rome" / "Images" / "Train" / "pano_00000_0_0.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    Image.new("RGB", (64, 32)).save(tmp_path / "Rome" / "Images" / "Train" / "pano_00001_0_0.jpg", format="PNG")
    (tmp_path / "Rome" / "Images" / "Train" / "Thumbs.db").write_bytes(b"")  # an extra file
    with pytest.raises(DatasetError) as err:
        prepare("nthu", str(tmp_path), workers=1, city="Rome")
    problems = err.value.problems
    expected = [
        f"Rome/Labels/Test/{names[0]}_eval.png: missing (label of Rome/Images/Test/{names[0]}.jpg)",
        f"Rome/Images/Test/{names[1]}.jpg: missing (image of Rome/Labels/Test/{names[1]}_eval.png)",
        f"Rome/Labels/Test/{names[2]}_eval.png: unknown label ids 40 (1 pixels)",
        f"Rome/Labels/Test/{names[3]}_eval.png: size 64x16 differs from image Rome/Images/Test/{names[3]}.jpg "
        "(64x32)",
        "Rome/Images/Train/pano_00000_0_0.jpg: unreadable or corrupt image",
        "Rome/Images/Train/pano_00001_0_0.jpg: expected a JPEG file, found PNG",
        "Rome/Images/Train/Thumbs.db: unexpected file (expected Rome/Images/Train/<name>.jpg)",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in problems), (line, problems)
    assert len(problems) == len(expected)
    assert not (tmp_path / "lists").exists() and not (tmp_path / "stats").exists()

    # A city that does not exist, or is not on disk; and a city for another dataset.
    with pytest.raises(DatasetError, match="--city Paris: not an NTHU Cross-City city; give one of Rome, Rio"):
        prepare("nthu", str(tmp_path), workers=1, city="Paris")
    with pytest.raises(DatasetError) as err:
        prepare("nthu", str(tmp_path), workers=1, city="Rio")
    assert err.value.problems == ["Rio/Images/Test/: folder not found", "Rio/Images/Train/: folder not found",
                                  "Rio/Labels/Test/: folder not found"]
    with pytest.raises(ValueError, match="--city selects an NTHU Cross-City city, not a part of cityscapes"):
        prepare("cityscapes", str(tmp_path), city="Rome")
    with pytest.raises(ValueError, match="nthu labels do not map to label space cityscapes19"):
        prepare("nthu", str(tmp_path), city="Rome", space="cityscapes19")


def test_the_nthu_config_is_cityscapes_to_one_city_in_13_classes():
    cfg = config.load(ExperimentConfig, str(REPO / "configs/cityscapes_nthu.yaml"), [])
    assert (cfg.label_space, cfg.num_classes, cfg.val_metric) == ("nthu13", 13, "mIoU-13")
    assert (cfg.data.target.dataset, cfg.data.target.split, cfg.data.val.split) == ("nthu", "rome_train", "rome_test")
    assert cfg.data.source.dataset == "cityscapes" and cfg.data.source.prepared.endswith("prepared_nthu13")


def _write_cityscapes_train(root: Path, count: int = 4, size=(32, 64)) -> None:
    for i in range(count):
        name = f"aachen_000000_{i:06d}"
        image = root / "leftImg8bit" / "train" / "aachen" / f"{name}_leftImg8bit.png"
        label = root / "gtFine" / "train" / "aachen" / f"{name}_gtFine_labelIds.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        label.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(RNG.integers(0, 256, (*size, 3), dtype=np.uint8)).save(image)
        Image.fromarray(RNG.choice(IDS, size)).save(label)
    (root / "leftImg8bit" / "val" / "lindau").mkdir(parents=True)
    Image.fromarray(RNG.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
        root / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png")


def tiny_chain(size: tuple[int, int], alpha: float) -> list[str]:
    """Overrides that make a shipped config's chain tiny: the small model, two steps a
    stage, one round of labels at ``size`` (width, height), no multi-scale, on CPU."""
    width, height = size
    return [f"crop_size=[{width},{height}]", "model.arch=deeplabv2_small", "source_crop_heights=[24,32]",
            "source_only.iterations=2", "source_only.batch_size=2", "source_only.checkpoint_every=2",
            "self_training.iterations=2", "self_training.batch_size=2", "self_training.checkpoint_every=2",
            f"self_training.rounds=[{{alpha: {alpha}, lr: 1.0e-4, pseudo_label_size: [{width}, {height}]}}]",
            "final_eval.sizes=[]", "compute.use_gpu=false", "compute.gpus_per_label_worker=0",
            "compute.loader_workers=0", "compute.cpus_per_worker=1", "compute.cpus_per_label_worker=1"]


def run_tiny_chain(cfg, space) -> dict:
    """Check and run ``cfg``; its stages, final metrics and round-1 label store must be in
    ``space`` (a LabelSpace). Returns the store's manifest."""
    cfg.check()
    records = run_experiment(cfg, ExperimentTracker(default_tracking_uri(cfg.output), cfg.name))
    assert [r.stage for r in records] == ["source_only", "round_1", "final_eval"]
    final = records[-1].metrics
    assert 0 <= final[f"val/mIoU-{space.num_classes}"] <= 1 and "val/mIoU-19" not in final
    assert {k.removeprefix("val/IoU/") for k in final if k.startswith("val/IoU/")} <= set(space.classes)
    manifest = LabelStore(cfg.label_store(1)).manifest()
    assert (manifest["label_space"], manifest["num_classes"]) == (space.name, space.num_classes)
    return manifest


@pytest.mark.slow  # about 2 minutes here: two stages and a labelling on Ray
def test_a_tiny_cityscapes_to_rome_round_reports_miou_13(ray_cluster, tmp_path):
    cityscapes, nthu = tmp_path / "cityscapes", tmp_path / "NTHU"
    _write_cityscapes_train(cityscapes)
    prepare("cityscapes", str(cityscapes), workers=1, space="nthu13")
    write_city(nthu, "Rome", train=4, test=2)
    prepare("nthu", str(nthu), workers=1, city="Rome")
    cfg = config.load(ExperimentConfig, str(REPO / "configs/cityscapes_nthu.yaml"), [
        f"output={tmp_path / 'out'}", f"data.source.root={cityscapes}",
        f"data.source.prepared={cityscapes / 'prepared_nthu13'}", f"data.target.root={nthu}",
        f"data.val.root={nthu}", "target_crop_heights=[24,32]", *tiny_chain((64, 32), alpha=0.2)])
    manifest = run_tiny_chain(cfg, NTHU13)
    assert manifest["num_images"] == 4
