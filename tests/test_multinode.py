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
import signal
import subprocess
import sys
import time

import pytest
import yaml
from ray_processes import RayNodes
from test_rounds import tiny_experiment

from pipeline import config, pseudo_label, storage
from pipeline.label_store import LabelStore
from pipeline.rounds import read_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _round_config(s3_round_inputs, benchmark_data, tmp_path, pseudo_label_size=(128, 64), **overrides):
    """One round over both nodes: two labelling actors and two training workers of 2 CPUs."""
    bucket, target = s3_round_inputs.bucket, s3_round_inputs.target
    cfg = tiny_experiment(benchmark_data, f"s3://{bucket}/out", **overrides, **{
        "data.target.root": target, "data.val.root": target, "model.init": s3_round_inputs.generator,
        "source_only.iterations": 0,  # round 1 starts from model.init
        "self_training.rounds": [{"alpha": 0.2, "lr": 1e-4, "pseudo_label_size": list(pseudo_label_size)}],
        # CBST keeps half of each class's pixels even for this random generator (IAS would keep none)
        "self_training.selector": "cbst", "self_training.cbst_portion": 0.5,
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",  # MLflow's SQLite store must be local
        "compute.num_workers": 2, "compute.cpus_per_worker": 2,
        "compute.placement_strategy": "SPREAD",  # one worker per node (the default packs them on one)
        "compute.label_workers": 2, "compute.cpus_per_label_worker": 2,
    })
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict(cfg)))
    return cfg, [sys.executable, "jobs/iast_round.py", "--config", str(config_file)]


def _start_two_nodes(cluster: RayNodes) -> dict[str, str]:
    cluster.ray("get-auth-token", "--generate")
    cluster.env["RAY_AUTH_MODE"] = "token"
    cluster.start_head(num_cpus=3, resources={"node_a": 1})
    cluster.add_node(num_cpus=3, resources={"node_b": 1})
    nodes = {name: n["node_id"] for n in cluster.alive_nodes() for name in ("node_a", "node_b")
             if name in n["resources_total"]}
    assert len(set(nodes.values())) == 2
    return nodes


def _actors(cluster: RayNodes) -> list[dict]:
    return cluster.api("/api/v0/actors?limit=10000&detail=true")["data"]["result"]["result"]


def _assert_labels_as_on_one_node(cfg, generator: str, tmp_path) -> None:
    """The round's label store holds what the session's local Ray (one actor) writes."""
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


@pytest.mark.slow
def test_a_round_spreads_over_two_nodes_and_labels_as_on_one(
    ray_cluster, s3_server, s3_round_inputs, benchmark_data, tmp_path
):
    cfg, command = _round_config(s3_round_inputs, benchmark_data, tmp_path)
    with RayNodes(env=s3_server.env) as cluster:
        nodes = _start_two_nodes(cluster)
        driver = subprocess.run(command, cwd=REPO, env={**cluster.env, "RAY_ADDRESS": cluster.gcs_address},
                                capture_output=True, text=True, timeout=900)
        assert driver.returncode == 0, f"{driver.stdout[-5000:]}\n{driver.stderr[-8000:]}"

        actors = _actors(cluster)
        seen = [(a["class_name"], a["repr_name"], a["node_id"]) for a in actors]
        # Ray Data names its pool actors after the callable: MapWorker(MapBatches(_Predictor))
        labelling = [a for a in actors if "(_Predictor)" in a["class_name"]]
        training = [a for a in actors if a["class_name"] == "RayTrainWorker"]
        assert len(labelling) == 2 and {a["node_id"] for a in labelling} == set(nodes.values()), (nodes, seen)
        assert len(training) == 2 and {a["node_id"] for a in training} == set(nodes.values()), (nodes, seen)

    record = read_record(cfg, "round_1")
    assert record is not None and record.checkpoint.startswith(f"s3://{s3_round_inputs.bucket}/out/train/round_1/")
    assert storage.exists(record.checkpoint)
    _assert_labels_as_on_one_node(cfg, s3_round_inputs.generator, tmp_path)


def _checkpoints(cfg, stage: str):
    """A function listing the Ray Train checkpoints of ``stage`` saved so far on S3."""
    import boto3

    bucket, _, prefix = storage.join(cfg.train_storage, stage).removeprefix("s3://").partition("/")
    client = boto3.client("s3")

    def saved() -> set[str]:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/checkpoint_").get("Contents", [])
        return {o["Key"].removeprefix(f"{prefix}/").split("/")[0] for o in listed}
    return saved


def _wait_for(what: str, found, driver: subprocess.Popen, log, timeout: float = 300):
    """Poll ``found()`` until it returns something true; fail if the driver ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.poll() is not None:
            raise AssertionError(f"the driver ended ({driver.returncode}) before {what}:\n{log.read_text()[-8000:]}")
        if result := found():
            return result
        time.sleep(0.2)
    raise AssertionError(f"no {what} after {timeout:.0f} s:\n{log.read_text()[-8000:]}")


@pytest.mark.slow
def test_a_worker_node_killed_mid_labelling_and_mid_round_the_round_ends_as_undisturbed(
    ray_cluster, s3_server, s3_round_inputs, benchmark_data, tmp_path
):
    """node_b dies (SIGKILL of all its processes) while its labelling actor is up, and its
    replacement dies once the round's training has saved its first checkpoint; each time a
    new node_b joins, as an autoscaler or an operator brings one. The same command finishes
    the round (one re-run allowed), with the labels of a one-node run, each image once."""
    # Labelling at 1024x512 keeps the actors at work for a while after they start; 8
    # training steps, a checkpoint every 2, leave the kill time before the round ends.
    cfg, command = _round_config(s3_round_inputs, benchmark_data, tmp_path, pseudo_label_size=(1024, 512), **{
        "self_training.iterations": 8, "self_training.checkpoint_every": 2})
    checkpoints = _checkpoints(cfg, "round_1")
    # Ray's health checks find a dead node in ~3 s instead of ~30 s.
    env = {**s3_server.env, "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
           "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    store = LabelStore(cfg.label_store(1))
    log = tmp_path / "driver.log"
    with RayNodes(env=env) as cluster:
        nodes = _start_two_nodes(cluster)
        driver_env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}

        def alive_on(class_part: str, node_id: str) -> list[dict]:
            return [a for a in _actors(cluster)
                    if class_part in a["class_name"] and a["node_id"] == node_id and a["state"] == "ALIVE"]

        def replace_node_b(index: int) -> str:
            cluster.kill_node(index)
            cluster.add_node(num_cpus=3, resources={"node_b": 1})
            return next(n["node_id"] for n in cluster.alive_nodes() if "node_b" in n["resources_total"])

        with open(log, "w") as out:
            driver = subprocess.Popen(command, cwd=REPO, env=driver_env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        try:
            _wait_for("labelling actor on node_b", lambda: alive_on("(_Predictor)", nodes["node_b"]), driver, log)
            assert not store.is_complete()  # mid-labelling
            second = replace_node_b(1)
            _wait_for("training worker on the new node_b", lambda: alive_on("RayTrainWorker", second), driver, log)
            saved = _wait_for("checkpoint of round 1", checkpoints, driver, log)
            assert store.is_complete() and len(saved) < 4 and read_record(cfg, "round_1") is None  # mid-round
            replace_node_b(2)
            returncode = driver.wait(timeout=600)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
        output = log.read_text()
        if returncode != 0:  # resumed by the same command
            rerun = subprocess.run(command, cwd=REPO, env=driver_env, capture_output=True, text=True, timeout=600)
            output += rerun.stdout + rerun.stderr
            assert rerun.returncode == 0, output[-8000:]
        actors = _actors(cluster)

    # The kill hit a labelling actor (Ray restarts it and records its new node, or Ray Data's
    # pool replaces it and the dead one stays recorded on the old node), and the training
    # worker group was started again.
    labelling = [a for a in actors if "(_Predictor)" in a["class_name"]]
    assert any(int(a["num_restarts"]) > 0 or a["node_id"] == nodes["node_b"] for a in labelling), labelling
    assert len([a for a in actors if a["class_name"] == "RayTrainWorker"]) >= 4, output[-8000:]
    record = read_record(cfg, "round_1")
    assert record is not None and storage.exists(record.checkpoint)
    labels = store.read_labels(["index", "name"]).to_pylist()
    assert sorted(r["index"] for r in labels) == list(range(10))  # every target image once
    _assert_labels_as_on_one_node(cfg, s3_round_inputs.generator, tmp_path)
