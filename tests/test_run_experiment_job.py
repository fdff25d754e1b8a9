"""jobs/run_experiment.py's last lines: where the figure is and the exact command that
opens the MLflow UI on the experiment's store."""

from __future__ import annotations

import re

import run_experiment  # jobs/run_experiment.py (conftest puts jobs/ on the path)

from pipeline import config, storage
from pipeline.experiment import ExperimentConfig
from pipeline.rounds import STAGES_FIGURE
from pipeline.tracking import default_tracking_uri

REPO_MAKEFILE = "Makefile"


def test_the_job_ends_with_the_figure_and_the_make_mlflow_ui_command(tmp_path):
    cfg = config.load(ExperimentConfig, "configs/benchmark.yaml", [f"output={tmp_path / 'out'}"])
    uri = default_tracking_uri(cfg.output)
    lines = run_experiment.closing_lines(cfg, uri)
    assert "Figure" not in lines  # not drawn yet (the chain stopped early)
    storage.write_bytes(storage.join(cfg.output, STAGES_FIGURE), b"png")
    lines = run_experiment.closing_lines(cfg, uri).splitlines()
    assert lines[0].endswith(f": {tmp_path}/out/figures/stages_on_val.png")
    assert lines[1] == f"MLflow store: {uri}"
    command = re.search(r"make mlflow-ui OUT=(\S+)", lines[2])
    assert command and command.group(1) == f"{tmp_path}/out"
    # the target and its OUT variable exist, and it serves OUT/mlflow.db
    makefile = open(REPO_MAKEFILE).read()
    assert re.search(r"^mlflow-ui:", makefile, re.M)
    assert "--backend-store-uri sqlite:///$(abspath $(strip $(OUT)))/mlflow.db" in makefile

    server = run_experiment.closing_lines(cfg, "http://mlflow.internal:5000")  # a tracking server
    assert "make mlflow-ui" not in server and "MLflow store: http://mlflow.internal:5000" in server
