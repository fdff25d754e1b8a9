"""A round on a Ray cluster of two nodes on this machine, storage shared through S3.

A head and a worker node, each started with ``ray start`` with 3 CPUs and a resource of
its own (``node_a``, ``node_b``). Every pseudo-labelling actor and every training worker
asks for 2 CPUs, so only one fits on a node: the round can only run spread over both
(the CPU left on each node runs Ray Data's read tasks). The driver is
``jobs/iast_round.py`` joining the cluster through RAY_ADDRESS, in a process of its own;
the nodes reach the S3 server through their environment. Placement is read from Ray's
own records (the state API), and the labels are compared with a one-node run.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import yaml
from ray_processes import RayNodes
from test_rounds import tiny_experiment

from pipeline import config, pseudo_label, storage
from pipeline.label_store import LabelStore
from pipeline.rounds import read_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_a_round_spreads_over_two_nodes_and_labels_as_on_one(
    ray_cluster, s3_server, s3_round_inputs, benchmark_data, tmp_path
):
    bucket, target, generator = s3_round_inputs.bucket, s3_round_inputs.target, s3_round_inputs.generator

    cfg = tiny_experiment(benchmark_data, f"s3://{bucket}/out", **{
        "data.target.root": target, "data.val.root": target, "model.init": generator,
        "source_only.iterations": 0,  # round 1 starts from model.init
        "self_training.rounds": [{"alpha": 0.2, "lr": 1e-4, "pseudo_label_size": [128, 64]}],
        # CBST keeps half of each class's pixels even for this random generator (IAS would keep none)
        "self_training.selector": "cbst", "self_training.cbst_portion": 0.5,
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",  # MLflow's SQLite store must be local
        "compute.num_workers": 2, "compute.cpus_per_worker": 2,
        "compute.placement_strategy": "SPREAD",  # one worker per node (the default packs them on one)
        "compute.label_workers": 2, "compute.cpus_per_label_worker": 2,
    })
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict(cfg)))

    with RayNodes(env=s3_server.env) as cluster:
        cluster.ray("get-auth-token", "--generate")
        cluster.env["RAY_AUTH_MODE"] = "token"
        cluster.start_head(num_cpus=3, resources={"node_a": 1})
        cluster.add_node(num_cpus=3, resources={"node_b": 1})
        nodes = {name: n["node_id"] for n in cluster.alive_nodes() for name in ("node_a", "node_b")
                 if name in n["resources_total"]}
        assert len(set(nodes.values())) == 2

        driver = subprocess.run(
            [sys.executable, "jobs/iast_round.py", "--config", str(config_file)], cwd=REPO,
            env={**cluster.env, "RAY_ADDRESS": cluster.gcs_address}, capture_output=True, text=True, timeout=900,
        )
        assert driver.returncode == 0, f"{driver.stdout[-5000:]}\n{driver.stderr[-8000:]}"

        actors = cluster.api("/api/v0/actors?limit=10000&detail=true")["data"]["result"]["result"]
        seen = [(a["class_name"], a["repr_name"], a["node_id"]) for a in actors]
        # Ray Data names its pool actors after the callable: MapWorker(MapBatches(_Predictor))
        labelling = [a for a in actors if "(_Predictor)" in a["class_name"]]
        training = [a for a in actors if a["class_name"] == "RayTrainWorker"]
        assert len(labelling) == 2 and {a["node_id"] for a in labelling} == set(nodes.values()), (nodes, seen)
        assert len(training) == 2 and {a["node_id"] for a in training} == set(nodes.values()), (nodes, seen)

    record = read_record(cfg, "round_1")
    assert record is not None and record.checkpoint.startswith(f"s3://{bucket}/out/train/round_1/")
    assert storage.exists(record.checkpoint)

    # The same labels as a one-node run (the session's local Ray, one labelling actor).
    two_nodes = LabelStore(cfg.label_store(1))
    label_cfg = cfg.round_label_config(1, generator)
    one_node = dataclasses.replace(label_cfg, store=str(tmp_path / "one_node"), num_workers=1)
    manifest = pseudo_label.run(one_node)
    assert two_nodes.manifest()["statistics"] == manifest["statistics"]
    assert 0 < manifest["statistics"]["coverage_all"] < 1  # a real selection, not all or nothing
    one = LabelStore(one_node.store)
    for a, b in zip(two_nodes.iter_predictions(manifest["num_parts"]), one.iter_predictions(manifest["num_parts"]),
                    strict=True):
        assert a.name == b.name and a.prediction.tobytes() == b.prediction.tobytes()
        assert a.confidence.tobytes() == b.confidence.tobytes()
    columns = ["index", "name", "label", "thresholds", "class_kept"]
    assert two_nodes.read_labels(columns).to_pylist() == one.read_labels(columns).to_pylist()
