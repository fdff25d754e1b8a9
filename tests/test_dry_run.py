"""The dry run (``jobs/run_experiment.py --check``): the config, every path, the MLflow
server and the Ray cluster's resources, checked before any stage starts, with nothing
created. Against node shapes given directly, and against a two-node ``ray start``
cluster with its data and output on the moto S3 server."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import boto3
import pytest
import yaml
from ray_processes import RayNodes
from test_rounds import tiny_experiment

from pipeline import cluster, config
from pipeline.cluster import NodeShape

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HEAD = NodeShape("head", {"CPU": 0}, 1)
V100X4 = NodeShape("v100x4", {"CPU": 28, "GPU": 4}, 4)
V100X1 = NodeShape("v100x1_spot", {"CPU": 8, "GPU": 1}, math.inf)


def _gpu_experiment(benchmark_data, tmp_path, **compute):
    settings = {"use_gpu": True, "cpus_per_worker": 4, "label_workers": 4, "gpus_per_label_worker": 1,
                "cpus_per_label_worker": 4, "eval_workers": 4, "loader_workers": 0, **compute}
    return tiny_experiment(benchmark_data, tmp_path / "out", **{f"compute.{k}": v for k, v in settings.items()})


def test_stages_are_placed_on_the_node_shapes(benchmark_data, tmp_path):
    cfg = _gpu_experiment(benchmark_data, tmp_path, num_workers=2)
    assert cluster.problems(cfg, [HEAD, V100X4]) == []
    assert "training (STRICT_PACK): 2 x {CPU 4, GPU 2}" not in cluster.summary(cfg, [HEAD, V100X4])
    assert "training (STRICT_PACK): 2 x {CPU 4, GPU 1} -> v100x4" in cluster.summary(cfg, [HEAD, V100X4])

    # STRICT_PACK: two 1-GPU nodes cannot hold two workers together; PACK may spread them
    assert "no node can hold all 2 x {CPU 4, GPU 1} together" in "\n".join(cluster.problems(cfg, [HEAD, V100X1]))
    packed = _gpu_experiment(benchmark_data, tmp_path, num_workers=2, placement_strategy="PACK")
    assert cluster.problems(packed, [HEAD, V100X1]) == []

    # a CPU-only cluster: nothing that wants a GPU fits, each named
    found = cluster.problems(cfg, [NodeShape("cpu", {"CPU": 16}, 1)])
    assert [p.split(":")[0] for p in found] == ["training (STRICT_PACK)", "pseudo-labelling actors", "evaluation tasks"]

    # four labelling actors of 1 GPU on one 1-GPU node: the pool cannot start at once
    one = [HEAD, NodeShape("v100x1", {"CPU": 8, "GPU": 1}, 1)]
    found = cluster.problems(_gpu_experiment(benchmark_data, tmp_path, num_workers=1), one)
    assert found == [f"pseudo-labelling actors: the cluster holds 1 of the 4 x {{CPU 4, GPU 1}} at once (its "
                     f"nodes: head: CPU 0; v100x1: CPU 8, GPU 1)"]


def test_remote_output_needs_a_tracking_uri(benchmark_data, tmp_path):
    cfg = tiny_experiment(benchmark_data, "s3://bucket/out")
    assert any(p.startswith("tracking_uri: set it") for p in cfg.problems())


@pytest.mark.slow
def test_the_dry_run_checks_an_s3_experiment_against_a_two_node_cluster(s3_server, s3_round_inputs,
                                                                        benchmark_data, tmp_path):
    bucket, target, generator = s3_round_inputs.bucket, s3_round_inputs.target, s3_round_inputs.generator
    base = {
        "data.target.root": target, "data.val.root": target, "model.init": generator,
        "source_only.iterations": 0,
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "compute.num_workers": 2, "compute.cpus_per_worker": 2, "compute.placement_strategy": "SPREAD",
        "compute.label_workers": 2, "compute.cpus_per_label_worker": 2,
    }
    good = tiny_experiment(benchmark_data, f"s3://{bucket}/out", **base)
    # A missing list on S3, and training on GPUs the CPU nodes do not have
    bad = tiny_experiment(benchmark_data, f"s3://{bucket}/out", **{
        **base, "data.val.root": f"s3://{bucket}/no_such_data",
        "compute.use_gpu": True, "compute.num_workers": 3, "compute.placement_strategy": "STRICT_PACK",
        "self_training.batch_size": 3})
    files = {}
    for name, cfg in (("good", good), ("bad", bad)):
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(config.to_dict(cfg)))

    with RayNodes(env=s3_server.env) as nodes:
        nodes.ray("get-auth-token", "--generate")
        nodes.env["RAY_AUTH_MODE"] = "token"
        nodes.start_head(num_cpus=3, resources={"node_a": 1})
        nodes.add_node(num_cpus=3, resources={"node_b": 1})

        def check(name: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "jobs/run_experiment.py", "--check", "--config", str(files[name])],
                                  cwd=REPO, env={**nodes.env, "RAY_ADDRESS": nodes.gcs_address},
                                  capture_output=True, text=True, timeout=300)

        done = check("good")
        assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        assert f"check ok: tiny, output s3://{bucket}/out" in done.stdout
        assert "training (SPREAD): 2 x {CPU 2}" in done.stdout
        assert "pseudo-labelling actors: 2 x {CPU 2}" in done.stdout

        done = check("bad")
    report = done.stdout + done.stderr
    assert done.returncode == 2, report[-5000:]
    assert "problems before any work started" in report, report[-5000:]
    assert f"s3://{bucket}/no_such_data" in report  # the val list that is not there
    assert "training (STRICT_PACK): no node can hold one worker of 3 x {CPU 2, GPU 1}" in report

    # Nothing was created: no object under the output, no MLflow store
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="out")
    assert listed["KeyCount"] == 0
    assert not (tmp_path / "mlflow.db").exists()


def test_labelling_actors_that_take_every_cpu_leave_none_for_ray_datas_decode_tasks(benchmark_data, tmp_path):
    # The 4-GPU node's 28 CPUs taken by four actors of 7: nothing left to decode images
    greedy = _gpu_experiment(benchmark_data, tmp_path, num_workers=1, cpus_per_label_worker=7)
    found = cluster.problems(greedy, [HEAD, NodeShape("v100x4", {"CPU": 28, "GPU": 4}, 1)])
    assert found == ["pseudo-labelling actors: with all 4 x {CPU 7, GPU 1} up, no node has {CPU 1} left for "
                     "Ray Data's image-decode tasks, so labelling would wait forever (the cluster's nodes: head: "
                     "CPU 0; v100x4: CPU 28, GPU 4); lower compute.cpus_per_label_worker to leave a CPU on a node, "
                     "or compute.label_workers"]
    # a CPU on the head, a second node, or one CPU fewer per actor: the decode tasks have room
    assert cluster.problems(greedy, [NodeShape("head", {"CPU": 2}, 1), NodeShape("v100x4", {"CPU": 28, "GPU": 4}, 1)]) == []
    assert cluster.problems(greedy, [HEAD, NodeShape("v100x4", {"CPU": 28, "GPU": 4}, 2)]) == []
    assert cluster.problems(_gpu_experiment(benchmark_data, tmp_path, num_workers=1, cpus_per_label_worker=6),
                            [HEAD, NodeShape("v100x4", {"CPU": 28, "GPU": 4}, 1)]) == []
    # a local 2-CPU instance with one actor of 2 CPUs (the hang the platform notes record)
    local = tiny_experiment(benchmark_data, tmp_path / "local", **{"compute.label_workers": 1,
                                                                   "compute.cpus_per_label_worker": 2})
    assert any("image-decode" in p for p in cluster.problems(local, [NodeShape("local", {"CPU": 2}, 1)]))
    assert not any("image-decode" in p for p in cluster.problems(local, [NodeShape("local", {"CPU": 4}, 1)]))
