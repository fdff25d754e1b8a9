"""The MLflow UI, started the documented way (`make mlflow-ui`), in a real headless browser
(Debian's chromium; `make test` installs it): the stage runs of an experiment, and the
comparison of two experiments' parent runs, whose rounds the UI draws as two curves."""

from __future__ import annotations

import os
import shutil
import urllib.parse

import numpy as np
import pytest
from mlflow_screenshot import (  # jobs/mlflow_screenshot.py
    CHROMIUM, compare_url, curves, metric_link, metric_url, mlflow_ui, parent_runs, query, render,
)
from PIL import Image

from pipeline.tracking import ExperimentTracker, default_tracking_uri

STAGES = ["source_only", "round_1", "round_2", "final_eval"]
SCREENSHOT_COPY = "/tmp/mlflow_ui.png"
# Two experiments' val mIoU-19 over the rounds (step 0: the warm-up model they share).
COMPARED = {"ui-iast": ("IAST", [0.30, 0.36, 0.39, 0.40]), "ui-hiast": ("HIAST", [0.30, 0.38, 0.42, 0.44])}


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"{CHROMIUM} not found: this test drives Debian's headless chromium. `make test` installs it "
            "(make system-packages), or `apt-get install chromium chromium-driver`."
        )
    return CHROMIUM


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """Pipeline-shaped experiments in OUT/mlflow.db, written through the tracker as the jobs
    do: "ui-check" (parent run, one child run per stage) and the two of COMPARED."""
    out = tmp_path_factory.mktemp("ui") / "outputs"
    tracker = ExperimentTracker(default_tracking_uri(str(out)), "ui-check")
    ids = {}
    for i, stage in enumerate(STAGES):
        ids[stage] = tracker.stage_run(stage)
        tracker.log_validation(ids[stage], {"mIoU-19": 0.30 + 0.05 * i})
        tracker.set_tags(ids[stage], checkpoint_uri=f"{out}/{stage}/checkpoint.pt")
        tracker.finish(ids[stage])
    tracker.finish(tracker.parent_run_id)
    for name, (method, miou) in COMPARED.items():
        compared = ExperimentTracker(default_tracking_uri(str(out)), name, run_name=f"{name}: {method}, 3 rounds",
                                     tags={"method": method, "rounds": 3})
        for r, value in enumerate(miou):
            run = compared.stage_run("source_only" if r == 0 else f"round_{r}")
            compared.log_validation(run, {"mIoU-19": value})
            compared.finish(run)  # each finished round adds its point to the parent's curve
        compared.finish(compared.parent_run_id)
    return {"out": out, "experiment_id": tracker.experiment_id, "run_ids": ids}


@pytest.fixture(scope="module")
def mlflow_ui_url(experiment):
    """`make mlflow-ui OUT=... PORT=...` in its own process group, stopped whatever happens."""
    try:
        with mlflow_ui(str(experiment["out"]), str(experiment["out"].parent / "mlflow-ui.log")) as url:
            yield url
    except RuntimeError as err:
        pytest.fail(str(err))


def _render(browser, url, tmp_path, screenshot) -> str:
    try:
        return render(url, screenshot, str(tmp_path / "chromium-profile"), browser)
    except RuntimeError as err:
        pytest.fail(str(err))


def test_mlflow_ui_shows_the_stage_runs(browser, experiment, mlflow_ui_url, tmp_path):
    # The runs table of the experiment, in the "Model training" view, sorted by a metric:
    # sorting by a metric lists child runs flat instead of folding them under the parent.
    query = urllib.parse.urlencode(
        {"workflowType": "machine_learning", "orderByKey": "metrics.`val/mIoU-19`", "orderByAsc": "false"}
    )
    page = f"{mlflow_ui_url}/#/experiments/{experiment['experiment_id']}/runs?{query}"
    screenshot = str(tmp_path / "mlflow_ui.png")
    dom = _render(browser, page, tmp_path, screenshot)
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


def test_mlflow_ui_compares_two_experiments_rounds_as_two_curves(browser, experiment, mlflow_ui_url, tmp_path):
    runs = parent_runs(default_tracking_uri(str(experiment["out"])), list(COMPARED))
    names = [name for _, _, name in runs]
    assert names == ["ui-iast: IAST, 3 rounds", "ui-hiast: HIAST, 3 rounds"]

    # The compare view of the two parent runs (the UI's "Compare" on two selected runs) ...
    dom = _render(browser, compare_url(mlflow_ui_url, runs), tmp_path, str(tmp_path / "compare.png"))
    assert "Comparing 2 Runs from 2 Experiments" in dom
    assert all(name in dom for name in names)
    link = metric_link(dom, "rounds/val/mIoU-19")  # ... links each metric to its curves
    assert all(run_id in urllib.parse.unquote(link) for _, run_id, _ in runs)
    built = query(metric_url(mlflow_ui_url, runs, "rounds/val/mIoU-19"))  # what the screenshot job opens
    linked = query(link)
    assert {k: linked[k] for k in ("runs", "metric", "experiments", "x_axis")} == {
        k: built[k] for k in ("runs", "metric", "experiments", "x_axis")}

    # ... where the parents' series are drawn over the rounds: one curve per run, 4 points each.
    screenshot = str(tmp_path / "mlflow_compare_rounds.png")
    dom = _render(browser, f"{mlflow_ui_url}/{link}", tmp_path, screenshot)
    shutil.copyfile(screenshot, "/tmp/mlflow_compare_rounds.png")
    print(f"MLflow compare screenshot: {screenshot} (copied to /tmp/mlflow_compare_rounds.png)")
    drawn = curves(dom)
    assert len(drawn) == 2, f"expected the two runs' curves, found {len(drawn)}"
    assert all(len(points) == 4 for points in drawn)
    assert all(f"{name} (rounds/val/mIoU-19)" in dom for name in names)  # the legend
    # Both start at the shared warm-up (step 0); HIAST ends higher, i.e. nearer the top (smaller y).
    (x0, y0), (x1, y1) = drawn[0][0], drawn[1][0]
    assert (x0, y0) == pytest.approx((x1, y1))
    assert drawn[0][-1][0] == pytest.approx(drawn[1][-1][0]) and drawn[0][-1][1] != pytest.approx(drawn[1][-1][1])
    ends = sorted(points[-1][1] for points in drawn)
    top, bottom = ends
    # the y pixel scale from the shared start (0.30) and the lower end (IAST's 0.40)
    scale = (y0 - bottom) / (0.40 - 0.30)
    assert top == pytest.approx(y0 - scale * (0.44 - 0.30), abs=2)

    image = np.asarray(Image.open(screenshot).convert("RGB"))
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 200, "the screenshot is (nearly) blank"
