"""The README's `ray job submit` recipe, run for real against a head this test starts.

Exactly the documented commands, in the cluster's own HOME and temp dir:

    ray get-auth-token --generate
    RAY_AUTH_MODE=token ray start --head --dashboard-host 127.0.0.1 ...
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:<port> --working-dir . \\
        --runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": ...}}' -- python jobs/iast_round.py --config ...

The target images and the generator are on the test S3 server. The node has the
credentials (its "AWS chain") but not the endpoint: that reaches the job only through
its runtime env, as the README says to pass it.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml
from mlflow import MlflowClient
from ray_processes import RayNodes
from s3_server import CREDENTIALS
from test_rounds import tiny_experiment

from pipeline import config
from pipeline.rounds import read_record
from pipeline.tracking import default_tracking_uri

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _submit(cluster: RayNodes, submission_id: str, *entrypoint: str, runtime_env: dict) -> str:
    """`ray job submit` from the repository root (waits for the job); returns its log."""
    done = cluster.ray("job", "submit", "--address", cluster.dashboard, "--submission-id", submission_id,
                       "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint,
                       cwd=REPO, check=False)
    job = cluster.api(f"/api/jobs/{submission_id}")
    assert job["status"] == "SUCCEEDED", f"{job['message']}\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _stage_outputs(out) -> dict[str, int]:
    """Modification times of everything the stages wrote (records, labels, checkpoints)."""
    return {str(p): p.stat().st_mtime_ns for sub in ("stages", "labels", "train") for p in (out / sub).rglob("*")}


@pytest.mark.slow  # 110-130 s on the shared 2-core machine: a head, two jobs, a Ray Train run
def test_a_submitted_round_is_tracked_in_mlflow_and_a_resubmitted_one_does_no_work(
    s3_server, s3_round_inputs, benchmark_data, tmp_path
):
    target, generator = s3_round_inputs.target, s3_round_inputs.generator

    cfg = tiny_experiment(benchmark_data, tmp_path / "out", **{
        "data.target.root": target, "data.val.root": target, "model.init": generator,
        "source_only.iterations": 0,  # round 1 starts from model.init
        "self_training.rounds": [{"alpha": 0.2, "lr": 1e-4, "pseudo_label_size": [128, 64]}],
    })
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict(cfg)))
    runtime_env = {"env_vars": {"AWS_ENDPOINT_URL": s3_server.endpoint}}
    user_token = os.path.expanduser("~/.ray/auth_token")
    user_token_before = open(user_token).read() if os.path.exists(user_token) else None

    with RayNodes(env=CREDENTIALS) as cluster:
        cluster.env.pop("AWS_ENDPOINT_URL", None)  # the node does not know the endpoint; the job does
        cluster.ray("get-auth-token", "--generate")  # writes the token into the cluster's own HOME
        cluster.env["RAY_AUTH_MODE"] = "token"
        cluster.start_head(num_cpus=4)

        log = _submit(cluster, "round-1", "python", "jobs/iast_round.py", "--config", str(config_file),
                      runtime_env=runtime_env)
        record = read_record(cfg, "round_1")
        assert record is not None and f"round 1: checkpoint {record.checkpoint}" in log
        assert "pseudo-label: predict" in log and "RayTrainWorker" in log  # it labelled and trained
        assert record.lineage["generator"] == generator

        client = MlflowClient(default_tracking_uri(cfg.output))
        experiment = client.get_experiment_by_name("tiny")
        runs = client.search_runs([experiment.experiment_id])
        by_stage = {r.data.tags["stage"]: r.data for r in runs}
        assert set(by_stage) == {"experiment", "round_1"}
        metrics = by_stage["round_1"].metrics
        for name in ("val/mIoU-19", "val/IoU/road", "pseudo/coverage", "pseudo/threshold/road",
                     "pseudo/num_images", "train/loss", "train/seg", "train/ignored_reg"):
            assert name in metrics, name
        assert 0 <= metrics["val/mIoU-19"] <= 1 and 0 <= metrics["pseudo/coverage"] <= 1
        assert by_stage["round_1"].tags["checkpoint_uri"] == record.checkpoint

        # the same round again: it reports the finished record and changes nothing
        stamp = _stage_outputs(tmp_path / "out")
        assert any(p.endswith(".parquet") for p in stamp)
        log = _submit(cluster, "round-1-again", "python", "jobs/iast_round.py", "--config", str(config_file),
                      "--round", "1", runtime_env=runtime_env)
        assert f"round 1: checkpoint {record.checkpoint}" in log
        assert "pseudo-label" not in log and "RayTrainWorker" not in log  # no labelling, no training
        assert read_record(cfg, "round_1") == record
        assert len(client.search_runs([experiment.experiment_id])) == len(runs)
        assert _stage_outputs(tmp_path / "out") == stamp
    assert (open(user_token).read() if os.path.exists(user_token) else None) == user_token_before  # not replaced
