"""A real ``mlflow server`` (loopback, SQLite) unreachable during training.

Training goes on; the metrics reported meanwhile reach MLflow once the server answers
again (with the next report, or from the driver after the stage), each once, at its
own step; while it does not, their count is reported. The server starts in 20-30 s on
two cores, so these are slow tests sharing one server.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from mlflow import MlflowClient

from mlflow_server import MlflowServer
from outage import Outage
from pipeline.tracking import ExperimentTracker, ReportToMlflow

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    mlflow = MlflowServer(str(tmp_path_factory.mktemp("mlflow-server"))).start()
    yield mlflow
    mlflow.stop()


def _history(uri: str, run_id: str, key: str = "train/loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_reports_held_during_a_cut_are_delivered_once_with_the_next_report(server, tmp_path):
    tracker = ExperimentTracker(server.uri, "held-reports")
    run = tracker.stage_run("source_only")
    proxy = Outage(("127.0.0.1", server.port))  # a network cut in front of the real server
    pending = str(tmp_path / "pending.jsonl")
    callback = ReportToMlflow(proxy.endpoint, run, pending)

    def report(step):
        callback.after_report(None, [{"step": step, "train/loss": 10.0 - step, "train/lr": 0.01}], None)

    report(1), report(2)
    proxy.cut()
    for step in (3, 4, 5):
        report(step)  # no error: training would go on
    assert _history(server.uri, run) == [(1, 9.0), (2, 8.0)]
    assert os.path.exists(pending)
    proxy.restore()
    report(6)
    assert _history(server.uri, run) == [(s, 10.0 - s) for s in range(1, 7)]  # each once, at its step
    assert len(MlflowClient(server.uri).get_metric_history(run, "train/lr")) == 6
    assert not os.path.exists(pending) and callback.deliver_pending() == 0
    proxy.cut()


def test_training_goes_on_while_the_server_is_down_and_its_metrics_arrive_after(
    ray_cluster, server, benchmark_data, tmp_path
):
    from pipeline.train import TrainConfig, fit

    tracker = ExperimentTracker(server.uri, "outage-during-training")
    run = tracker.stage_run("source_only")
    callback = tracker.report_callback(run)
    iterations = 24
    cfg = TrainConfig(
        stage="source_only", name="mlflow-outage", storage=str(tmp_path / "runs"), iterations=iterations,
        lr=1e-3, arch="deeplabv2_small", source=benchmark_data["source"], batch_size=2, crop_size=(64, 32),
        source_crop_heights=(48, 96), checkpoint_every=iterations, log_every=1, loader_workers=0,
        num_workers=1, cpus_per_worker=1,
    )

    stopped_after: list[int] = []

    def stop_at_the_first_metric():  # the server dies while training runs
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not stopped_after:
            seen = _history(server.uri, run)
            if seen:
                server.stop()
                stopped_after.append(len(seen))
            time.sleep(0.2)

    watcher = threading.Thread(target=stop_at_the_first_metric, daemon=True)
    watcher.start()
    try:
        result = fit(cfg, callbacks=[callback])
        watcher.join(5)
        assert stopped_after and stopped_after[0] < iterations  # the server was down for the later steps
        assert result.metrics["step"] == iterations  # training finished regardless

        held = callback.deliver_pending()  # the driver, still without a server: the loss is counted
        assert held > 0
        with open(callback.pending_file) as f:
            assert len(f.readlines()) == held
    finally:
        server.start()  # the same port and database
    assert callback.deliver_pending() == 0
    history = _history(server.uri, run)
    assert [step for step, _ in history] == list(range(1, iterations + 1))  # every step, each once
    assert not os.path.exists(callback.pending_file)
