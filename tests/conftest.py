"""Shared fixtures. One local Ray cluster per test session, started and stopped here."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from s3_server import s3_server  # noqa: F401  (a session fixture: a moto S3 server on loopback)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A local Ray instance for the whole session (ray.init costs seconds; start it once).

    Four logical CPUs on a 2-core machine: Ray Data's read tasks need CPU slots beside
    the actors and train workers, or a 2-CPU cluster deadlocks (platform notes).
    """
    import ray

    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp
    # Environment set after ray.init does not reach Ray's workers: hand them the test S3 server.
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
             runtime_env={"env_vars": s3_server.env})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def benchmark_data(tmp_path_factory):
    """A tiny built-in benchmark, generated and prepared: {"source": DataConfig, ...}."""
    from pipeline.data.benchmark import generate
    from pipeline.data.datasets import DataConfig
    from pipeline.data.prepare import prepare

    root = tmp_path_factory.mktemp("benchmark")
    generate(str(root), seed=3, num_source=8, num_target_train=10, num_target_val=4, workers=1)
    prepare("gta5", str(root / "source"), workers=1)
    prepare("cityscapes", str(root / "target"), workers=1)
    return {
        "root": root,
        "source": DataConfig("gta5", str(root / "source")),
        "target": DataConfig("cityscapes", str(root / "target"), "train"),
        "val": DataConfig("cityscapes", str(root / "target"), "val"),
    }


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """A small DeepLab-v2 with random (seeded) weights, saved as a checkpoint of ours."""
    import torch

    from pipeline.models import build_model, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "small.pt"
    save_checkpoint(str(path), build_model("deeplabv2_small", 19))
    return str(path)
