"""Label spaces (Cityscapes-19, NTHU-13, RobotCar-9): tables, metrics, palettes, and
checkpoints, label stores and prepared labels of another space refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cityscapesscripts.helpers.labels import id2label, name2label
from PIL import Image

from pipeline import config, labels
from pipeline.data.datasets import DataConfig, list_samples, load_label
from pipeline.data.prepare import prepare
from pipeline.evaluation import ConfusionMatrix
from pipeline.experiment import ExperimentConfig
from pipeline.labels import CITYSCAPES19, NTHU13, ROBOTCAR9, label_space
from pipeline.models import build_model, load_checkpoint, save_checkpoint
from pipeline.visualize import overlay

# method.md §11, typed from the reference: Cityscapes label id -> NTHU-13 train id.
NTHU_FROM_CITYSCAPES_ID = {7: 0, 8: 1, 11: 2, 19: 3, 20: 4, 21: 5, 23: 6, 24: 7, 25: 8, 26: 9, 28: 10, 32: 11, 33: 12}
# RobotCar raw id -> train id (sky 0, person 1, two-wheel 2, automobile 3, sign 4, light 5,
# building 6, sidewalk 7, road 8).
ROBOTCAR_FROM_RAW = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 6: 5, 7: 6, 10: 7, 11: 8, 12: 8, 13: 8, 14: 8, 17: 8}
# Cityscapes class -> RobotCar train id; wall, fence, pole, vegetation, terrain, train ignored.
ROBOTCAR_FROM_CITYSCAPES = {"road": 8, "sidewalk": 7, "building": 6, "traffic light": 5, "traffic sign": 4,
                            "sky": 0, "person": 1, "rider": 1, "car": 3, "truck": 3, "bus": 3,
                            "motorcycle": 2, "bicycle": 2}


def test_nthu13_maps_every_cityscapes_label_id_as_the_reference_table():
    table = NTHU13.raw_to_train("nthu")
    assert {i: int(table[i]) for i in range(256) if table[i] != 255} == NTHU_FROM_CITYSCAPES_ID
    np.testing.assert_array_equal(NTHU13.raw_to_train("cityscapes"), table)  # the source, same 13 classes
    assert NTHU13.num_classes == 13 and NTHU13.headline == "mIoU-13"
    for label_id, k in NTHU_FROM_CITYSCAPES_ID.items():  # names and colours are cityscapesScripts'
        assert NTHU13.classes[k] == id2label[label_id].name
        assert tuple(NTHU13.palette[k]) == id2label[label_id].color


def test_robotcar9_maps_raw_ids_and_cityscapes_classes():
    raw = ROBOTCAR9.raw_to_train("robotcar")
    assert {i: int(raw[i]) for i in range(256) if raw[i] != 255} == ROBOTCAR_FROM_RAW
    cs = ROBOTCAR9.raw_to_train("cityscapes")
    expected = {name2label[n].id: k for n, k in ROBOTCAR_FROM_CITYSCAPES.items()}
    assert {i: int(cs[i]) for i in range(256) if cs[i] != 255} == expected
    assert ROBOTCAR9.classes == ("sky", "person", "two-wheel", "automobile", "sign", "light", "building",
                                 "sidewalk", "road")
    assert tuple(ROBOTCAR9.palette[3]) == name2label["car"].color
    with pytest.raises(ValueError, match="gta5 labels do not map to label space robotcar9"):
        ROBOTCAR9.raw_to_train("gta5")


def test_cityscapes19_is_todays_table_and_metrics():
    np.testing.assert_array_equal(CITYSCAPES19.raw_to_train("gta5"), labels.GTA5_ID_TO_TRAIN)
    np.testing.assert_array_equal(CITYSCAPES19.raw_to_train("synthia"), labels.SYNTHIA_ID_TO_TRAIN)
    np.testing.assert_array_equal(CITYSCAPES19.palette, labels.PALETTE)
    assert list(CITYSCAPES19.miou) == ["mIoU-19", "mIoU-16", "mIoU-13"]
    assert CITYSCAPES19.miou["mIoU-16"] == labels.MIOU16_CLASSES
    keys = set(ConfusionMatrix(19).summary())
    assert keys == {f"IoU/{n}" for n in labels.CLASS_NAMES} | {"mIoU-19", "mIoU-16", "mIoU-13", "pixel_accuracy"}
    with pytest.raises(ValueError, match="unknown label space 'kitti'"):
        label_space("kitti")


@pytest.mark.parametrize("space, headline", [("nthu13", "mIoU-13"), ("robotcar9", "mIoU-9")])
def test_summary_and_table_follow_the_space(space, headline):
    s = label_space(space)
    k = s.num_classes
    matrix = np.diag(np.arange(1, k + 1)).astype(np.int64)
    matrix[0, 1] = 3  # class 0: tp 1, fn 3 -> IoU 1/4; class 1: tp 2, fp 3 -> IoU 2/5
    cm = ConfusionMatrix(k, matrix, space)
    summary = cm.summary()
    assert set(summary) == {f"IoU/{c}" for c in s.classes} | {headline, "pixel_accuracy"}
    assert summary[f"IoU/{s.classes[0]}"] == pytest.approx(0.25)
    assert summary[f"IoU/{s.classes[1]}"] == pytest.approx(0.4)
    assert summary[headline] == pytest.approx((0.25 + 0.4 + (k - 2)) / k)
    assert f"| {headline}" in cm.table() and "mIoU-19" not in cm.table()
    assert (cm + cm).summary()[headline] == pytest.approx(summary[headline])  # the space survives a merge
    with pytest.raises(ValueError, match=f"label space {space} has {k} classes, not 19"):
        ConfusionMatrix(19, space=space)


def test_overlay_uses_the_space_palette():
    image = np.zeros((1, 3, 3), np.uint8)
    out = overlay(image, np.array([[8, 9, 255]], np.uint8), alpha=1.0, space="robotcar9")
    assert tuple(out[0, 0]) == name2label["road"].color  # robotcar9's road is train id 8
    assert tuple(out[0, 1]) == (0, 0, 0) and tuple(out[0, 2]) == (0, 0, 0)  # past its 9 classes: untouched


def test_checkpoint_of_another_space_is_refused_naming_file_and_spaces(tmp_path):
    path = str(tmp_path / "cs19.pt")
    save_checkpoint(path, build_model("deeplabv2_small", 19), label_space="cityscapes19")
    with pytest.raises(ValueError, match=rf"checkpoint {path}: label space cityscapes19 \(19 classes\), "
                                         r"but the experiment's is nthu13 \(13 classes\)"):
        load_checkpoint(build_model("deeplabv2_small", 13), path, label_space="nthu13")
    older = str(tmp_path / "older.pt")  # no label_space entry: known by its 9 outputs
    save_checkpoint(older, build_model("deeplabv2_small", 9))
    with pytest.raises(ValueError, match=rf"{older}: label space robotcar9.*the experiment's is nthu13"):
        load_checkpoint(build_model("deeplabv2_small", 13), older, label_space="nthu13")
    load_checkpoint(build_model("deeplabv2_small", 9), older, label_space="robotcar9")


def test_label_store_of_another_space_is_refused(benchmark_data, tmp_path):
    from pipeline.label_store import LabelStore
    from pipeline.train import TrainConfig, check_config

    store = LabelStore(str(tmp_path / "labels"))
    store.commit({"num_classes": 19, "label_space": "cityscapes19", "num_parts": 0})
    cfg = TrainConfig(stage="self_training", name="r", storage=str(tmp_path / "runs"), iterations=1, lr=1e-3,
                      arch="deeplabv2_small", num_classes=13, label_space="nthu13", val_metric="mIoU-13",
                      label_store=store.uri, loader_workers=0)
    with pytest.raises(ValueError, match=rf"label store {store.uri}: label space cityscapes19 \(19 classes\), "
                                         r"but the experiment's is nthu13"):
        check_config(cfg)
    with pytest.raises(ValueError, match="val_metric must be one of mIoU-9, pixel_accuracy"):
        TrainConfig(stage="source_only", name="r", storage=str(tmp_path), iterations=1, lr=1e-3,
                    num_classes=9, label_space="robotcar9")


def _experiment(tmp_path, **overrides) -> ExperimentConfig:
    base = {"name": "t", "output": str(tmp_path / "out"), "source_only": {"iterations": 1},
            "data": {"source": {"dataset": "cityscapes", "root": str(tmp_path)},
                     "target": {"dataset": "cityscapes", "root": str(tmp_path)},
                     "val": {"dataset": "cityscapes", "root": str(tmp_path), "split": "val"}},
            "self_training": {"iterations": 1, "rounds": [{"alpha": 0.2, "lr": 1e-4, "pseudo_label_size": [64, 32]}]}}
    return config.from_dict(ExperimentConfig, {**base, **overrides})


def test_experiment_takes_classes_and_metrics_from_the_label_space(tmp_path):
    default = _experiment(tmp_path)
    assert (default.label_space, default.num_classes, default.val_metric) == ("cityscapes19", 19, "mIoU-19")
    cfg = _experiment(tmp_path, label_space="nthu13")
    assert (cfg.num_classes, cfg.val_metric) == (13, "mIoU-13")
    train_cfg = cfg.round_train_config(1, "x.pt")
    label_cfg = cfg.round_label_config(1, "x.pt")
    assert (train_cfg.num_classes, train_cfg.label_space, train_cfg.val_metric) == (13, "nthu13", "mIoU-13")
    assert (label_cfg.num_classes, label_cfg.label_space) == (13, "nthu13")
    with pytest.raises(config.ConfigError, match="num_classes is 16, but label_space robotcar9 has 9 classes"):
        _experiment(tmp_path, label_space="robotcar9", num_classes=16)
    with pytest.raises(config.ConfigError, match="val_metric 'mIoU-19' is not reported in label space nthu13"):
        _experiment(tmp_path, label_space="nthu13", val_metric="mIoU-19")


def _write_cityscapes(root: Path, split: str, names: list[str], ids: np.ndarray) -> None:
    for name in names:
        city = name.split("_")[0]
        img = root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png"
        lab = root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        lab.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((*ids.shape, 3), 90, np.uint8)).save(img)
        Image.fromarray(ids).save(lab)


def test_cityscapes_prepared_in_another_space_beside_its_own(tmp_path):
    ids = np.array([[7, 8, 12, 19], [26, 27, 33, 0]], np.uint8)  # road sidewalk wall light / car truck bicycle
    _write_cityscapes(tmp_path, "train", ["aachen_000000_000019"], ids)
    _write_cityscapes(tmp_path, "val", ["lindau_000000_000019"], ids)
    prepare("cityscapes", str(tmp_path), workers=1)
    done = prepare("cityscapes", str(tmp_path), workers=1, space="nthu13")
    out = tmp_path / "prepared_nthu13"
    assert done.out == str(out) and done.label_space == "nthu13"
    (sample,) = list_samples("cityscapes", str(tmp_path), "train", str(out))
    np.testing.assert_array_equal(load_label(sample.label), [[0, 1, 255, 3], [9, 255, 12, 255]])
    own = list_samples("cityscapes", str(tmp_path), "train")[0]  # the 19-class preparation is untouched
    np.testing.assert_array_equal(load_label(own.label), labels.CITYSCAPES_ID_TO_TRAIN[ids])
    stats = pq.read_table(out / "stats" / "cityscapes_train.parquet")
    assert stats.schema.metadata == {b"label_space": b"nthu13"}
    assert stats["class_pixels"][0].as_py() == [1, 1, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 1]
    assert pq.read_schema(tmp_path / "stats" / "cityscapes_train.parquet").metadata is None  # as before

    # An NTHU experiment refuses the 19-class preparation, naming the file, both spaces and the fix.
    cfg = _experiment(tmp_path, label_space="nthu13")
    cfg.data.val = DataConfig("cityscapes", str(tmp_path), "val", str(out))
    found = "\n".join(cfg.problems())
    assert (f"data.target's labels ({tmp_path}/stats/cityscapes_train.parquet): label space "
            "cityscapes19 (19 classes), but the experiment's is nthu13 (13 classes)") in found
    assert "--label-space nthu13" in found
    assert "data.source's labels" in found and "data.val" not in found  # val: prepared in nthu13
