"""The GPU cluster path, checked without a GPU: placement of a stage's DDP workers, one
gradient all-reduce per adversarial step, fp16 autocast only where it takes effect, the
GradScaler's state in the checkpoint."""

from __future__ import annotations

import pytest

from pipeline import config
from pipeline.experiment import ExperimentConfig
from pipeline.train import TrainConfig, scaling_config


def _train_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(stage="source_only", name="run", storage=str(tmp_path / "runs"), iterations=5, lr=1e-3,
                arch="deeplabv2_small", batch_size=4, num_workers=4, use_gpu=True, cpus_per_worker=6)
    base.update(kw)
    return TrainConfig(**base)


def test_a_stages_workers_are_strictly_packed_on_one_node_by_default(tmp_path):
    scaling = scaling_config(_train_cfg(tmp_path))
    assert scaling.placement_strategy == "STRICT_PACK"
    assert (scaling.num_workers, scaling.use_gpu) == (4, True)
    assert scaling._resources_per_worker_not_none == {"CPU": 6, "GPU": 1}  # what Ray reserves per worker
    # the bundles Ray reserves: one per worker, on one node
    assert scaling.as_placement_group_factory().strategy == "STRICT_PACK"
    assert scaling_config(_train_cfg(tmp_path, placement_strategy="SPREAD")).placement_strategy == "SPREAD"


def test_the_compute_setting_reaches_every_stage_and_is_checked(tmp_path):
    data = {"target": {"dataset": "cityscapes", "root": str(tmp_path), "split": "train"},
            "val": {"dataset": "cityscapes", "root": str(tmp_path), "split": "val"},
            "source": {"dataset": "gta5", "root": str(tmp_path), "split": "train"}}
    raw = {"name": "x", "output": str(tmp_path / "out"), "data": data, "source_only": {"iterations": 10},
           "self_training": {"rounds": [{"alpha": 0.2, "lr": 1e-4, "pseudo_label_size": [64, 32]}],
                             "iterations": 10}}
    cfg = config.from_dict(ExperimentConfig, raw)
    assert cfg.warmup_config("source_only", None).placement_strategy == "STRICT_PACK"
    packed = config.from_dict(ExperimentConfig, {**raw, "compute": {"placement_strategy": "PACK"}})
    assert packed.round_train_config(1, "x.pt").placement_strategy == "PACK"
    with pytest.raises(ValueError, match="compute: placement_strategy must be one of STRICT_PACK"):
        config.from_dict(ExperimentConfig, {**raw, "compute": {"placement_strategy": "pack"}})
