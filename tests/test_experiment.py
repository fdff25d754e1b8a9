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
