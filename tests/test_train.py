import hashlib
import os
import time

import pytest
import ray.train
import torch

from pipeline import config
from pipeline.label_store import LabelStore
from pipeline.train import TrainConfig, check_config, fit


def _cfg(tmp_path, benchmark_data, **kw):
    base = dict(
        stage="source_only", name="run", storage=str(tmp_path / "runs"), iterations=5, lr=1e-3,
        arch="deeplabv2_small", source=benchmark_data["source"], batch_size=2, crop_size=(64, 32),
        source_crop_heights=(48, 96), target_crop_heights=(48, 96), checkpoint_every=2, log_every=1,
        loader_workers=0, num_workers=1, cpus_per_worker=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def _record(folder):
    """A per-step hook: each worker appends (step, parameter digest) to its own file."""
    def hook(step, model):
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
        rank = ray.train.get_context().get_world_rank()
        with open(os.path.join(folder, f"rank{rank}.log"), "a") as f:
            f.write(f"{step} {digest}\n")
    return hook


def _log(folder, rank):
    with open(os.path.join(folder, f"rank{rank}.log")) as f:
        return [tuple(line.split()) for line in f]


def test_ddp_replicas_stay_identical_and_a_killed_worker_resumes(ray_cluster, benchmark_data, tmp_path):
    folder = str(tmp_path)
    marker = tmp_path / "killed"
    record = _record(folder)

    def hook(step, model):
        record(step, model)
        if step == 3 and ray.train.get_context().get_world_rank() == 1 and not marker.exists():
            marker.touch()
            time.sleep(3)  # Ray Train registers the step-2 checkpoint asynchronously
            os._exit(1)  # the worker process dies mid-run

    cfg = _cfg(tmp_path, benchmark_data, num_workers=2, val=benchmark_data["val"])
    result = fit(cfg, on_step=hook)
    assert marker.exists()
    assert result.metrics["step"] == 5
    rank0, rank1 = _log(folder, 0), _log(folder, 1)
    # steps 1-3 ran, the group restarted from the step-2 checkpoint, then 3-5 ran again
    assert [int(s) for s, _ in rank0] == [1, 2, 3, 3, 4, 5]
    assert rank0 == rank1  # same weights on both replicas after every step
    assert "val/mIoU-19" in result.metrics and 0 <= result.metrics["val/mIoU-19"] <= 1
    state = torch.load(result.checkpoint, weights_only=True)
    assert state["step"] == 5 and state["config"]["stage"] == "source_only"
    assert {"model", "optimizer", "scheduler"} <= set(state)


def test_a_second_invocation_with_the_same_name_resumes(ray_cluster, benchmark_data, tmp_path):
    folder = str(tmp_path)
    record = _record(folder)

    def crash(step, model):
        record(step, model)
        if step == 3:
            raise RuntimeError("simulated crash")

    cfg = _cfg(tmp_path, benchmark_data, max_failures=0)
    with pytest.raises(Exception, match="simulated crash"):
        fit(cfg, on_step=crash)
    result = fit(cfg, on_step=record)
    steps = [int(s) for s, _ in _log(folder, 0)]
    assert steps == [1, 2, 3, 3, 4, 5]  # resumed after the step-2 checkpoint
    assert result.metrics["step"] == 5


def test_bad_configs_fail_before_training(benchmark_data, tmp_path):
    with pytest.raises(config.ConfigError, match="unknown config key.*learning_rate"):
        config.from_dict(TrainConfig, {**config.to_dict(_cfg(tmp_path, benchmark_data)), "learning_rate": 1})
    missing = _cfg(tmp_path, benchmark_data, source=benchmark_data["source"].__class__("gta5", str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        check_config(missing)
    store = LabelStore(str(tmp_path / "labels"))
    store.commit({"num_classes": 16, "num_parts": 0})
    wrong = _cfg(tmp_path, benchmark_data, stage="self_training", label_store=store.uri)
    with pytest.raises(ValueError, match="16 classes"):
        check_config(wrong)
    with pytest.raises(ValueError, match="needs `target`"):
        check_config(_cfg(tmp_path, benchmark_data, stage="oracle"))
