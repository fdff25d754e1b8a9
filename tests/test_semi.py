"""Semi-supervised Cityscapes: the split written by prepare_data.py --semi, and a tiny round
of the setting on the built-in benchmark's target."""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import config
from pipeline.data.datasets import list_samples
from pipeline.data.prepare import SEMI_SEED, DatasetError, prepare, semi_count
from pipeline.experiment import ExperimentConfig
from pipeline.label_store import LabelStore
from pipeline.rounds import run_experiment
from pipeline.tracking import ExperimentTracker, default_tracking_uri

REPO = Path(__file__).resolve().parents[1]
main = runpy.run_path(str(REPO / "jobs" / "prepare_data.py"))["main"]
TRAIN = [f"aachen_000000_{i:06d}" for i in range(5)] + [f"bremen_000001_{i:06d}" for i in range(3)]


def write_cityscapes(root: Path, splits: dict[str, list[str]], labelled: bool = True) -> None:
    """The official layout: leftImg8bit RGB png, gtFine 8-bit label-id png."""
    rng = np.random.default_rng(1)
    for split, names in splits.items():
        for name in names:
            city = name.split("_")[0]
            image = root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (4, 8, 3), dtype=np.uint8)).save(image)
            if labelled:
                label = root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png"
                label.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.choice(np.array([7, 8, 26, 0], np.uint8), (4, 8))).save(label)


def test_semi_count_rounds_a_fraction_up_like_the_published_splits():
    assert [semi_count(f, 2975) for f in ("1/8", "1/4", "1/2")] == [372, 744, 1488]
    assert semi_count("100", 2975) == 100
    assert semi_count("1", 2975) == 1  # a count of one frame
    for bad in ("3/2", "0", "abc", "2975", "1.5", "0.5"):
        with pytest.raises(ValueError, match=f"--semi {bad}"):
            semi_count(bad, 2975)


def test_semi_split_is_a_fixed_nested_documented_list(tmp_path):
    write_cityscapes(tmp_path, {"train": TRAIN, "val": ["lindau_000000_000019"]})
    done = prepare("cityscapes", str(tmp_path), workers=1, semi="1/4")
    assert done.frames == {"train": 8, "val": 1, "train_labeled_1-4": 2, "train_unlabeled_1-4": 6}
    order = (tmp_path / "lists" / "cityscapes_train_order.txt").read_text().split()
    assert order == [sorted(TRAIN)[i] for i in np.random.default_rng(SEMI_SEED).permutation(8)]
    labeled = list_samples("cityscapes", str(tmp_path), "train_labeled_1-4")
    unlabeled = list_samples("cityscapes", str(tmp_path), "train_unlabeled_1-4")
    assert [s.name for s in labeled] == sorted(order[:2])  # the first N of the order, listed by name
    assert {s.name for s in unlabeled} == set(order[2:])
    train = {s.name: s for s in list_samples("cityscapes", str(tmp_path), "train")}
    assert all(s.label == train[s.name].label for s in labeled + unlabeled)  # train's own train-id files

    # Another fraction takes the same order: 1/4 is inside 1/2; a re-run keeps it.
    (tmp_path / "lists" / "cityscapes_train_order.txt").write_text("\n".join(order) + "\n")
    assert main(["--dataset", "cityscapes", "--root", str(tmp_path), "--semi", "1/2", "--workers", "1"]) == 0
    half = {s.name for s in list_samples("cityscapes", str(tmp_path), "train_labeled_1-2")}
    assert half == set(order[:4]) and {s.name for s in labeled} <= half
    assert (tmp_path / "lists" / "cityscapes_train_order.txt").read_text().split() == order


def test_semi_split_problems_are_reported_before_writing(tmp_path):
    write_cityscapes(tmp_path, {"train": TRAIN, "val": ["lindau_000000_000019"]}, labelled=False)
    with pytest.raises(DatasetError) as err:
        prepare("cityscapes", str(tmp_path), workers=1, semi="1/8")
    assert "gtFine/train/: folder not found (a semi-supervised split needs train's labels)" in err.value.problems
    assert not (tmp_path / "lists").exists()

    labelled = tmp_path / "labelled"
    write_cityscapes(labelled, {"train": TRAIN, "val": ["lindau_000000_000019"]})
    (labelled / "lists").mkdir()
    (labelled / "lists" / "cityscapes_train_order.txt").write_text("aachen_000000_000000\nzurich_000000_000000\n")
    with pytest.raises(DatasetError) as err:
        prepare("cityscapes", str(labelled), workers=1, semi="9")
    text = str(err.value)
    assert "--semi 9: labels 9 of the 8 train frames" in text
    assert f"{labelled}/lists/cityscapes_train_order.txt: holds 1 frame(s) not in train and misses 7" in text
    assert not (labelled / "lists" / "cityscapes_train.txt").exists()
    with pytest.raises(ValueError, match="--semi splits Cityscapes train, not gta5"):
        prepare("gta5", str(labelled), semi="1/8")


def test_semi_configs_name_the_fraction_splits():
    for path in ("configs/cityscapes_semi.yaml", "configs/benchmark_semi.yaml"):
        cfg = config.load(ExperimentConfig, str(REPO / path), [])
        assert (cfg.data.source.split, cfg.data.target.split) == ("train_labeled_1-8", "train_unlabeled_1-8")
        assert cfg.data.source.root == cfg.data.target.root == cfg.data.val.root and cfg.data.val.split == "val"
        assert cfg.source_only.iterations > 0 and cfg.adversarial.iterations == 0  # the supervised baseline


@pytest.mark.slow  # about 2 minutes here: two stages and a labelling on Ray
def test_a_tiny_semi_supervised_round_on_the_benchmark_target(ray_cluster, benchmark_data, tmp_path):
    target = tmp_path / "target"
    shutil.copytree(benchmark_data["target"].root, target)
    prepare("cityscapes", str(target), workers=1, semi="1/2")  # 5 of the fixture's 10 train frames
    cfg = config.load(ExperimentConfig, str(REPO / "configs/benchmark_semi.yaml"), [
        f"output={tmp_path / 'out'}", f"data.source.root={target}", f"data.target.root={target}",
        f"data.val.root={target}", "data.source.split=train_labeled_1-2", "data.target.split=train_unlabeled_1-2",
        "crop_size=[64,32]", "source_crop_heights=[48,96]", "target_crop_heights=[48,96]",
        "source_only.iterations=2", "source_only.batch_size=2", "source_only.checkpoint_every=2",
        "self_training.iterations=2", "self_training.batch_size=2", "self_training.checkpoint_every=2",
        "self_training.rounds=[{alpha: 0.2, lr: 1.0e-4, pseudo_label_size: [128, 64]}]",
        "final_eval.sizes=[]", "final_eval.flip=false", "compute.cpus_per_worker=1",
        "compute.cpus_per_label_worker=1", "compute.decoded_cache_mb=0"])
    cfg.check()
    records = run_experiment(cfg, ExperimentTracker(default_tracking_uri(cfg.output), cfg.name))
    assert [r.stage for r in records] == ["source_only", "round_1", "final_eval"]
    assert 0 <= records[0].metrics["val/mIoU-19"] <= 1  # the supervised-only baseline on val
    labelled = {s.name for s in cfg.data.source.samples()}
    store = LabelStore(cfg.label_store(1))
    assert store.manifest()["num_images"] == 5  # pseudo-labels for the unlabelled half only
    assert labelled.isdisjoint(s.name for s in cfg.data.target.samples())
    assert 0 <= records[-1].metrics["val/mIoU-19"] <= 1
