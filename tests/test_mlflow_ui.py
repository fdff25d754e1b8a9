"""The MLflow UI, started the documented way (`make mlflow-ui`), shows the stage runs in
a real headless browser (Debian's chromium; `.ci/run` installs it)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

from pipeline.tracking import ExperimentTracker, default_tracking_uri

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
STAGES = ["source_only", "round_1", "round_2", "final_eval"]
SCREENSHOT_COPY = "/tmp/mlflow_ui.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (started with start_new_session=True), SIGKILL to
    whatever is left of it after 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"{CHROMIUM} not found: this test drives Debian's headless chromium. Install it with "
            "`apt-get install chromium chromium-driver` (.ci/run does this before `make test`)."
        )
    return CHROMIUM


@pytest.fixture
def experiment(tmp_path):
    """A pipeline-shaped experiment in OUT/mlflow.db: parent run, one child run per stage."""
    out = tmp_path / "outputs"
    tracker = ExperimentTracker(default_tracking_uri(str(out)), "ui-check")
    ids = {}
    for i, stage in enumerate(STAGES):
        ids[stage] = tracker.stage_run(stage)
        tracker.log_validation(ids[stage], {"mIoU-19": 0.30 + 0.05 * i})
        tracker.set_tags(ids[stage], checkpoint_uri=f"{out}/{stage}/checkpoint.pt")
        tracker.finish(ids[stage])
    tracker.finish(tracker.parent_run_id)
    return {"out": out, "experiment_id": tracker.experiment_id, "run_ids": ids}


@pytest.fixture
def mlflow_ui(experiment, tmp_path):
    """`make mlflow-ui OUT=... PORT=...` in its own process group, stopped whatever happens."""
    port = free_port()
    log = open(tmp_path / "mlflow-ui.log", "wb")
    # `-o <stamp>`: this test already runs inside the installed venv; don't re-install.
    cmd = ["make", "-s", "-o", ".venv/.installed", "mlflow-ui", f"OUT={experiment['out']}", f"PORT={port}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`{' '.join(cmd)}` exited with {proc.returncode}:\n{(tmp_path / 'mlflow-ui.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"MLflow UI not up after 90 s:\n{(tmp_path / 'mlflow-ui.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)
        log.close()


def render(browser: str, url: str, tmp_path, screenshot: str) -> str:
    """Render ``url`` headless (virtual time lets the React app fetch and draw); returns the DOM."""
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1600,1000",
        "--virtual-time-budget=30000", f"--screenshot={screenshot}", "--dump-dom", url,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        dom, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("chromium did not finish rendering the MLflow UI in 120 s")
    finally:
        stop(proc)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}):\n{err.decode(errors='replace')[-3000:]}"
    return dom.decode()


def test_mlflow_ui_shows_the_stage_runs(browser, experiment, mlflow_ui, tmp_path):
    # The runs table of the experiment, in the "Model training" view, sorted by a metric:
    # sorting by a metric lists child runs flat instead of folding them under the parent.
    query = urllib.parse.urlencode(
        {"workflowType": "machine_learning", "orderByKey": "metrics.`val/mIoU-19`", "orderByAsc": "false"}
    )
    page = f"{mlflow_ui}/#/experiments/{experiment['experiment_id']}/runs?{query}"
    screenshot = str(tmp_path / "mlflow_ui.png")
    dom = render(browser, page, tmp_path, screenshot)
    shutil.copyfile(screenshot, SCREENSHOT_COPY)
    print(f"MLflow UI screenshot: {screenshot} (copied to {SCREENSHOT_COPY})")

    for stage, run_id in experiment["run_ids"].items():  # each stage's name, linking to its run
        link = f'href="#/experiments/{experiment["experiment_id"]}/runs/{run_id}"'
        assert link in dom, f"run {stage} ({run_id}) is not linked in the rendered runs table"
        after = dom[dom.index(link) :][:300]
        assert f">{stage}<" in after, f"the link to run {run_id} does not show its name {stage}"
    assert "ui-check" in dom  # the experiment's name in the breadcrumb

    image = np.asarray(Image.open(screenshot).convert("RGB"))
    assert image.shape[:2] == (1000, 1600)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 200, "the screenshot is (nearly) blank"
