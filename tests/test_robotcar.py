"""Oxford RobotCar as HIAST uses it: RGBA annotations (class id in channel 0) converted to
the 9 classes, train images one folder deeper accepted, bad input reported at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import config
from pipeline.data.datasets import list_samples, load_label
from pipeline.data.prepare import DatasetError, prepare
from pipeline.experiment import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(3)
RAW = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], np.uint8)
# reference §11: raw id -> train id (sky, person, two-wheel, automobile, sign, light,
# building, sidewalk, road); every other raw id 255.
TRAIN_ID = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 6: 5, 7: 6, 10: 7, 11: 8, 12: 8, 13: 8, 14: 8, 17: 8}


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def rgba_annotation(ids: np.ndarray) -> np.ndarray:
    """Class id in channel 0, other channels unrelated (as the released annotations)."""
    noise = RNG.integers(0, 256, (*ids.shape, 3), dtype=np.uint8)
    return np.dstack([ids, noise])


def write_robotcar(root: Path, size=(6, 8)) -> dict[str, np.ndarray]:
    write_png(root / "train" / "2015-10-29-12-18-17_07_000010.png", RNG.integers(0, 256, (*size, 3), np.uint8))
    write_png(root / "train" / "deeper" / "2015-10-29-12-18-17_07_000020.png",
              RNG.integers(0, 256, (*size, 3), np.uint8))
    labels = {}
    for name in ("2015-11-10-10-32-52_01_000100", "2015-11-10-10-32-52_01_000200"):
        labels[name] = RNG.choice(RAW, size)
        write_png(root / "val" / f"{name}.png", RNG.integers(0, 256, (*size, 3), np.uint8))
        write_png(root / "anno" / f"{name}.png", rgba_annotation(labels[name]))
    return labels


def test_robotcar_rgba_annotations_become_the_9_classes(tmp_path):
    labels = write_robotcar(tmp_path)
    done = prepare("robotcar", str(tmp_path), workers=1)
    assert done.label_space == "robotcar9" and done.frames == {"train": 2, "val": 2}
    train = list_samples("robotcar", str(tmp_path), "train")
    assert [s.image.rsplit("/", 2)[-2:] for s in train] == [["train", "2015-10-29-12-18-17_07_000010.png"],
                                                              ["deeper", "2015-10-29-12-18-17_07_000020.png"]]
    table = np.full(256, 255, np.uint8)
    table[list(TRAIN_ID)] = list(TRAIN_ID.values())
    for sample in list_samples("robotcar", str(tmp_path), "val"):
        np.testing.assert_array_equal(load_label(sample.label), table[labels[sample.name]])


def test_robotcar_bad_input_is_reported_in_one_list(tmp_path):
    labels = write_robotcar(tmp_path)
    first, second = sorted(labels)
    write_png(tmp_path / "anno" / f"{first}.png", labels[first])  # a grey annotation, not RGBA
    (tmp_path / "val" / f"{second}.png").unlink()
    write_png(tmp_path / "train" / "a" / "b" / "too_deep.png", np.zeros((6, 8, 3), np.uint8))
    with pytest.raises(DatasetError) as err:
        prepare("robotcar", str(tmp_path), workers=1)
    assert err.value.problems == sorted([
        f"anno/{first}.png: expected an RGBA annotation PNG (class id in channel 0), got mode L",
        f"val/{second}.png: missing (image of anno/{second}.png)",
        "train/a/b/too_deep.png: unexpected file (expected train/<name>.png or train/<folder>/<name>.png)",
    ])
    assert not (tmp_path / "lists").exists()


def test_the_robotcar_config_is_hiast_in_9_classes():
    cfg = config.load(ExperimentConfig, str(REPO / "configs/cityscapes_robotcar.yaml"), [])
    assert (cfg.label_space, cfg.num_classes, cfg.val_metric) == ("robotcar9", 9, "mIoU-9")
    assert cfg.self_training.consistency is not None and cfg.eval_size == (1280, 960)
    assert cfg.data.source.prepared.endswith("prepared_robotcar9") and cfg.data.val.dataset == "robotcar"


@pytest.mark.slow  # about 2 minutes here: two stages and a labelling on Ray
def test_a_tiny_cityscapes_to_robotcar_hiast_round_reports_miou_9(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient
    from test_nthu import _write_cityscapes_train, run_tiny_chain, tiny_chain

    from pipeline.labels import ROBOTCAR9
    from pipeline.tracking import default_tracking_uri

    cityscapes, robotcar = tmp_path / "cityscapes", tmp_path / "RobotCar"
    _write_cityscapes_train(cityscapes)
    prepare("cityscapes", str(cityscapes), workers=1, space="robotcar9")
    write_robotcar(robotcar, size=(48, 64))
    prepare("robotcar", str(robotcar), workers=1)
    cfg = config.load(ExperimentConfig, str(REPO / "configs/cityscapes_robotcar.yaml"), [
        f"output={tmp_path / 'out'}", f"data.source.root={cityscapes}",
        f"data.source.prepared={cityscapes / 'prepared_robotcar9'}", f"data.target.root={robotcar}",
        f"data.val.root={robotcar}", "target_crop_heights=[32,48]", "eval_size=[64,48]",
        *tiny_chain((64, 48), alpha=0.5)])
    assert run_tiny_chain(cfg, ROBOTCAR9)["num_images"] == 2
    client = MlflowClient(default_tracking_uri(cfg.output))
    experiment = client.get_experiment_by_name(cfg.name)
    (round_1,) = client.search_runs([experiment.experiment_id], "tags.stage = 'round_1'")
    assert "train/consistency" in round_1.data.metrics  # HIAST's teacher-student term ran
