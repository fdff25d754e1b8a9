"""Shared fixtures. One local Ray cluster per test session, started and stopped here."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance for the whole session (ray.init costs seconds; start it once).

    Four logical CPUs on a 2-core machine: Ray Data's read tasks need CPU slots beside
    the actors and train workers, or a 2-CPU cluster deadlocks (platform notes).
    """
    import ray

    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
