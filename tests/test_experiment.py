import pytest

from pipeline import config
from pipeline.experiment import ExperimentConfig


def test_check_validates_every_stage_before_any_runs(tmp_path):
    # source-only (batch 8) would train 25k steps before the adversarial stage (batch 4) failed
    cfg = config.load(ExperimentConfig, "configs/gta5_cityscapes.yaml",
                      [f"output={tmp_path / 'out'}", "compute.num_workers=8"])
    with pytest.raises(ValueError, match="adversarial: batch_size 4 must be divisible by num_workers 8"):
        cfg.check()
    cfg = config.load(ExperimentConfig, "configs/gta5_cityscapes.yaml",
                      [f"output={tmp_path / 'out'}", "compute.num_workers=2", "self_training.iterations=0"])
    with pytest.raises(ValueError, match="round_1: iterations must be >= 1"):
        cfg.check()
    cfg = config.load(ExperimentConfig, "configs/gta5_cityscapes.yaml",
                      [f"output={tmp_path / 'out'}", "compute.num_workers=4", "oracle.iterations=10",
                       "oracle.batch_size=6"])
    with pytest.raises(ValueError, match="oracle: batch_size 6 must be divisible by num_workers 4"):
        cfg.check()
    cfg = config.load(ExperimentConfig, "configs/gta5_cityscapes.yaml",
                      [f"output={tmp_path / 'out'}", "source_only.iterations=0"])
    with pytest.raises(ValueError, match="no warm-up to start from"):
        cfg.check()
    assert not (tmp_path / "out").exists()


def test_rounds_can_train_the_backbone_at_their_own_lr_ratio(tmp_path):
    cfg = config.load(ExperimentConfig, "configs/benchmark.yaml", [f"output={tmp_path / 'out'}"])
    assert cfg.model.backbone_lr_mult == 1.0 and cfg.self_training.backbone_lr_mult == 0.1
    assert cfg.warmup_config("source_only", None).backbone_lr_mult == 1.0
    assert cfg.warmup_config("oracle", None).backbone_lr_mult == 1.0
    assert cfg.round_train_config(1, "init.pt").backbone_lr_mult == 0.1
    unset = config.load(ExperimentConfig, "configs/benchmark.yaml",
                        [f"output={tmp_path / 'out'}", "self_training.backbone_lr_mult=null"])
    assert unset.round_train_config(1, "init.pt").backbone_lr_mult == 1.0  # the model's
    with pytest.raises(ValueError, match="self_training.backbone_lr_mult must be > 0"):
        config.load(ExperimentConfig, "configs/benchmark.yaml",
                    [f"output={tmp_path / 'out'}", "self_training.backbone_lr_mult=0"])


def test_a_held_out_source_split_is_optional_and_checked_when_given(tmp_path):
    cfg = config.load(ExperimentConfig, "configs/benchmark.yaml",
                      [f"output={tmp_path / 'out'}", "data.source_val=null"])
    assert cfg.data.source_val is None
    cfg = config.load(ExperimentConfig, "configs/benchmark.yaml",
                      [f"output={tmp_path / 'out'}", f"data.source_val.root={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cfg.data.source_val.samples()
