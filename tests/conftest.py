"""Shared fixtures. One local Ray cluster per test session, started and stopped here."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from types import SimpleNamespace

import pytest
from s3_server import s3_server  # noqa: F401  (a session fixture: a moto S3 server on loopback)

# Job scripts import their helpers as `python jobs/x.py` lets them: from jobs/ itself.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs"))


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
    import common  # jobs/common.py: its local instance ends with what outlives it (a Train controller was seen)

    raylets = common.start_local_ray(num_cpus=4, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
                                     runtime_env={"env_vars": s3_server.env})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    common.stop_local_ray(raylets)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def benchmark_data(tmp_path_factory):
    """A tiny built-in benchmark, generated and prepared: {"source": DataConfig, ...}."""
    from pipeline.data.benchmark import generate
    from pipeline.data.datasets import DataConfig
    from pipeline.data.prepare import prepare

    root = tmp_path_factory.mktemp("benchmark")
    generate(str(root), seed=3, num_source=8, num_target_train=10, num_target_val=4, num_source_val=3, workers=1)
    prepare("gta5", str(root / "source"), workers=1)
    prepare("gta5", str(root / "source_val"), workers=1)
    prepare("cityscapes", str(root / "target"), workers=1)
    return {
        "root": root,
        "source": DataConfig("gta5", str(root / "source")),
        "source_val": DataConfig("gta5", str(root / "source_val")),  # held-out source frames
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


@pytest.fixture
def s3_round_inputs(s3_server, benchmark_data, small_checkpoint, monkeypatch):
    """A fresh bucket on the test S3 server with the tiny benchmark's target set and the
    small generator in it; this test's environment points at the server. Returns
    ``bucket``, ``target`` (the target root URI) and ``generator`` (the weights URI)."""
    import boto3

    from pipeline import storage

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    bucket = f"round-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    target = f"s3://{bucket}/target"
    fs, path = storage.filesystem(target)
    fs.put(str(benchmark_data["target"].root), path, recursive=True)
    generator = f"s3://{bucket}/weights/small.pt"
    storage.write_bytes(generator, open(small_checkpoint, "rb").read())
    return SimpleNamespace(bucket=bucket, target=target, generator=generator)
