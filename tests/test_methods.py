"""The shared loop and every method's step in a plain Python process, without Ray."""

import json
import subprocess
import sys

import pytest

from pipeline import config
from pipeline.methods import HIAST, IAST, Adversarial, Oracle, SourceOnly, STvM, method_class
from pipeline.pseudo_label import PseudoLabelConfig, SelectorConfig
from pipeline.pseudo_label import run as make_labels
from pipeline.train import TrainConfig

RUN_WITHOUT_RAY = """
import json, sys
sys.modules["ray"] = None  # any import of Ray fails
from pipeline import config
from pipeline.train import TrainConfig, fit_local
out = {}
for name, cfg in json.loads(sys.argv[1]).items():
    result = fit_local(config.from_dict(TrainConfig, cfg))
    out[name] = {k: v for k, v in result.metrics.items() if k.startswith("train/")}
print("RESULT" + json.dumps(out))
"""


def test_each_stage_runs_its_method():
    def cfg(stage, **kw):
        return TrainConfig(stage=stage, name="x", storage="/tmp/x", iterations=1, lr=1e-3, **kw)

    assert method_class(cfg("source_only")) is SourceOnly
    assert method_class(cfg("oracle")) is Oracle
    assert method_class(cfg("adversarial")) is Adversarial
    assert method_class(cfg("self_training")) is IAST
    assert method_class(cfg("self_training", teacher_momentum=0.99)) is HIAST
    assert method_class(cfg("stvm")) is STvM


def test_every_method_trains_in_a_plain_process_without_ray(ray_cluster, benchmark_data, small_checkpoint, tmp_path):
    store = str(tmp_path / "labels")
    make_labels(PseudoLabelConfig(  # the label store is made with Ray; the training below runs without it
        target=benchmark_data["target"], store=store, checkpoint=small_checkpoint, arch="deeplabv2_small",
        size=(64, 32), selector=SelectorConfig(name="cbst", portion=0.5)))
    common = dict(storage=str(tmp_path / "runs"), iterations=2, lr=1e-3, arch="deeplabv2_small", batch_size=2,
                  crop_size=(64, 32), source_crop_heights=(48, 96), target_crop_heights=(48, 96), log_every=1,
                  loader_workers=0)
    d = benchmark_data
    stages = {
        "source_only": dict(stage="source_only", source=d["source"], val=d["val"]),
        "oracle": dict(stage="oracle", target=d["target"]),
        "adversarial": dict(stage="adversarial", source=d["source"], target=d["target"]),
        "iast": dict(stage="self_training", label_store=store, init=small_checkpoint),
        "hiast": dict(stage="self_training", label_store=store, init=small_checkpoint, teacher_momentum=0.9,
                      hard_classes=3),
        "stvm": dict(stage="stvm", target=d["target"], init=small_checkpoint),
    }
    configs = {name: config.to_dict(TrainConfig(name=name, **common, **kw)) for name, kw in stages.items()}
    done = subprocess.run([sys.executable, "-c", RUN_WITHOUT_RAY, json.dumps(configs)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(done.stdout.split("RESULT", 1)[1])
    assert set(metrics) == set(stages)
    for name, m in metrics.items():
        assert m["train/loss"] > 0, name
    assert metrics["hiast"]["train/consistency"] >= 0 and "train/confident_reg" in metrics["iast"]
    assert metrics["adversarial"]["train/discriminator"] > 0
    assert metrics["stvm"]["train/reliability"] > 0
    assert (tmp_path / "runs" / "source_only").is_dir()


def test_a_local_run_refuses_remote_storage(benchmark_data):
    from pipeline.train import fit_local

    cfg = TrainConfig(stage="source_only", name="x", storage="s3://bucket/runs", iterations=1, lr=1e-3,
                      source=benchmark_data["source"])
    with pytest.raises(ValueError, match="local folder.*fit\\(\\) on Ray"):
        fit_local(cfg)
