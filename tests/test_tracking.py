"""MLflow tracking: run structure and re-use, params, metric names, artifacts, comparison."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import time

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from PIL import Image

from pipeline import tracking
from pipeline.evaluation import ConfusionMatrix
from pipeline.labels import CLASS_NAMES, NUM_CLASSES
from pipeline.pseudo_label import selection_statistics
from pipeline.tracking import ExperimentTracker, comparison_table, default_tracking_uri


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one costs seconds); tests use their own experiments."""
    out = tmp_path_factory.mktemp("outputs")
    return {"out": out, "uri": default_tracking_uri(str(out))}


def documented_metric_names() -> set[str]:
    names = set(re.findall(r"``((?:val|pseudo|train)/[^`]+)``", tracking.__doc__))
    expanded = {n.replace("<class>", c) for n in names for c in CLASS_NAMES}
    return expanded


def summary_of_random_predictions() -> dict[str, float]:
    rng = np.random.default_rng(0)
    target = rng.integers(0, NUM_CLASSES, (32, 32))
    target[target == CLASS_NAMES.index("train")] = 0  # absent class: undefined IoU
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, NUM_CLASSES - 3, target.shape))
    cm = ConfusionMatrix()
    cm.update(pred, target)
    return cm.summary()


def manifest_with_statistics(previews: list[str]) -> dict:
    k = NUM_CLASSES
    pixels = np.full(k, 100, np.int64)
    pixels[5] = 0  # a class never predicted: coverage undefined
    kept = pixels // 2
    totals = {"class_pixels": pixels, "class_kept": kept, "class_correct": kept * 9 // 10, "class_judged": kept}
    return {
        "round": 2,
        "generator": {"checkpoint": "s3://alice:hunter2@bucket/round_1/checkpoint.pt", "sha256": "ab" * 32,
                      "arch": "deeplabv2_resnet101"},
        "selector": {"name": "ias", "alpha": 0.2, "beta": 0.9, "gamma": 8.0, "instance_size": 1},
        "num_images": 10,
        "statistics": selection_statistics(totals, np.linspace(0.5, 0.95, k),
                                           np.where(kept > 0, np.linspace(0.6, 0.99, k), np.nan)),
        "previews": previews,
    }


def test_default_tracking_uri(tmp_path):
    assert default_tracking_uri(str(tmp_path / "out")) == f"sqlite:///{tmp_path}/out/mlflow.db"
    with pytest.raises(ValueError, match="not local"):
        default_tracking_uri("s3://bucket/outputs")


def test_scrubbing():
    params = tracking.scrub_params({
        "aws_access_key_id": "AKIA", "s3.secret_access_key": "x", "hf_token": "t", "db.password": "p",
        "api-key": "k", "monkey": "fine", "tokenizer": "fine", "checkpoint": "http://bob:pw@host:5000/x",
    })
    assert params == {
        "aws_access_key_id": "***", "s3.secret_access_key": "***", "hf_token": "***", "db.password": "***",
        "api-key": "***", "monkey": "fine", "tokenizer": "fine", "checkpoint": "http://host:5000/x",
    }
    assert tracking.scrub_uri("from s3://u:p@b/k and s3://b/k2") == "from s3://b/k and s3://b/k2"


def test_parent_and_stage_runs_are_reused_on_resume(store):
    stages = ["source_only", "adversarial", "round_1", "round_2", "final_eval", "oracle"]
    first = ExperimentTracker(store["uri"], "resume")
    ids = {stage: first.stage_run(stage) for stage in stages}
    first.finish(ids["round_1"])
    first.finish(ids["round_2"], "FAILED")

    again = ExperimentTracker(store["uri"], "resume")  # the pipeline re-run: same names
    assert again.parent_run_id == first.parent_run_id
    assert {stage: again.stage_run(stage) for stage in stages} == ids
    other = ExperimentTracker(store["uri"], "resume", run_name="resume-seed2")
    assert other.parent_run_id != first.parent_run_id

    client = MlflowClient(store["uri"])
    runs = client.search_runs([first.experiment_id])
    assert len(runs) == len(stages) + 2  # two parents, no duplicate stage runs
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first.parent_run_id]
    assert sorted(r.info.run_name for r in children) == sorted(stages)
    tags = {r.info.run_name: r.data.tags for r in children}
    assert tags["round_2"]["stage"] == "round_2" and tags["round_2"]["round"] == "2"
    assert tags["source_only"]["round"] == "0" and "round" not in tags["final_eval"]
    round_2 = client.get_run(ids["round_2"])  # re-opened by the re-run after failing
    assert round_2.info.status == "RUNNING" and round_2.data.tags["status"] == "running"
    again.finish(ids["round_2"])
    round_2 = client.get_run(ids["round_2"])
    assert round_2.info.status == "FINISHED" and round_2.data.tags["status"] == "finished"
    with pytest.raises(ValueError, match="round_<r>"):
        again.stage_run("round_0")


def test_params_flattened_scrubbed_truncated_in_batches(store, tmp_path):
    tracker = ExperimentTracker(store["uri"], "params")
    run = tracker.stage_run("round_1")
    config = {
        "train": {"lr": 2.5e-5, "crop_size": [1024, 512], "storage": "s3://ak:sk@bucket/runs"},
        "aws": {"secret_access_key": "hunter2"},
        "notes": "x" * (MAX_PARAM_VAL_LENGTH + 10),
        "many": {f"k{i:03d}": i for i in range(150)},  # more than one batch of 100
    }
    tracker.log_config(run, config)
    tracker.log_config(run, config)  # a resumed run logs the same params again: fine
    params = MlflowClient(store["uri"]).get_run(run).data.params
    assert params["train.lr"] == "2.5e-05"
    assert params["train.crop_size"] == "[1024, 512]"
    assert params["train.storage"] == "s3://bucket/runs"
    assert params["aws.secret_access_key"] == "***"
    assert params["notes"] == "x" * MAX_PARAM_VAL_LENGTH
    assert params["many.k149"] == "149" and len(params) == 155

    with open(MlflowClient(store["uri"]).download_artifacts(run, "config.yaml", str(tmp_path))) as f:
        text = f.read()
    assert "lr: 2.5e-05" in text and "hunter2" not in text and "ak:sk" not in text

    with pytest.raises(ValueError, match=r"train\.lr: '2\.5e-05' -> '0\.001'"):
        tracker.log_config(run, {**config, "train": {**config["train"], "lr": 1e-3}})


def _artifacts(client: MlflowClient, run_id: str, path: str) -> list[str]:
    return sorted(os.path.basename(f.path) for f in client.list_artifacts(run_id, path))


def test_validation_metrics_have_the_documented_names_and_a_chart(store, tmp_path):
    tracker = ExperimentTracker(store["uri"], "validation")
    run = tracker.stage_run("round_1")
    summary = summary_of_random_predictions()
    tracker.log_validation(run, summary, step=40)
    client = MlflowClient(store["uri"])
    metrics = client.get_run(run).data.metrics
    assert set(metrics) <= documented_metric_names()
    assert metrics["val/mIoU-19"] == pytest.approx(summary["mIoU-19"])
    assert metrics["val/IoU/traffic light"] == pytest.approx(summary["IoU/traffic light"])
    assert "val/IoU/train" not in metrics  # NaN: undefined, not logged
    assert {"val/mIoU-16", "val/mIoU-13", "val/pixel_accuracy"} <= set(metrics)
    assert client.get_metric_history(run, "val/mIoU-19")[0].step == 40

    assert _artifacts(client, run, "charts") == ["val_iou.png"]
    chart = client.download_artifacts(run, "charts/val_iou.png", str(tmp_path))
    image = np.asarray(Image.open(chart).convert("RGB"))
    assert image.shape[0] > 300 and len(np.unique(image.reshape(-1, 3), axis=0)) > 19  # bars in class colours

    with pytest.raises(ValueError, match="not validation metrics: train/loss"):
        tracker.log_validation(run, {"train/loss": 1.0})


def test_training_reports(store):
    tracker = ExperimentTracker(store["uri"], "training")
    run = tracker.stage_run("adversarial")
    callback = tracker.report_callback(run)
    rank0 = {"step": 50, "train/loss": 1.5, "train/seg": 1.2, "train/adversarial": 0.3, "train/discriminator": 0.7,
             "train/lr": 2.5e-4, "train/data_wait_fraction": 0.1, "train/steps_per_s": 2.0}
    rank1 = {**rank0, "train/loss": 99.0}
    callback.after_report(None, [rank0, rank1], None)  # what Ray Train's controller calls
    callback.after_report(None, [{**rank0, "step": 100, "train/loss": 1.1}, rank1], None)
    tracker.log_metrics(run, {"step": 100, "train/confident_reg": 0.2, "train/ignored_reg": None})

    client = MlflowClient(store["uri"])
    metrics = client.get_run(run).data.metrics
    assert set(metrics) <= documented_metric_names()
    assert "train/ignored_reg" not in metrics and "step" not in metrics
    history = [(m.step, m.value) for m in client.get_metric_history(run, "train/loss")]
    assert sorted(history) == [(50, 1.5), (100, 1.1)]  # rank 0's values at the reported steps


def test_reports_to_an_unreachable_server_are_held_not_raised(tmp_path, caplog):
    from s3_server import _free_port

    pending = str(tmp_path / "pending.jsonl")
    callback = tracking.ReportToMlflow(f"http://127.0.0.1:{_free_port()}", "0123abcd", pending)  # nothing listens
    driver_copy = pickle.loads(pickle.dumps(callback))  # Ray Train runs a copy in its controller
    start = time.monotonic()
    with caplog.at_level("WARNING", "pipeline.tracking"):
        for step in (1, 2, 3):
            callback.after_report(None, [{"step": step, "train/loss": 1.0 / step, "train/lr": 0.1}], None)
    assert time.monotonic() - start < 15  # one try a report, not MLflow's minutes of retries
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "unreachable" in warned[0] and "training goes on" in warned[0]
    assert "(2 held now)" in warned[0]
    with open(pending) as f:
        held = [json.loads(line) for line in f]
    assert [(key, value, step) for key, value, _, step in held] == [
        ("train/loss", 1.0, 1), ("train/lr", 0.1, 1), ("train/loss", 0.5, 2), ("train/lr", 0.1, 2),
        ("train/loss", 1 / 3, 3), ("train/lr", 0.1, 3)]

    caplog.clear()
    with caplog.at_level("WARNING", "pipeline.tracking"):
        assert driver_copy.deliver_pending() == 6  # the driver's copy reads what its controller held
    assert "6 training metrics of MLflow run 0123abcd were not delivered" in caplog.text
    assert pending in caplog.text and os.path.exists(pending)


def test_metrics_held_when_a_stage_ended_are_delivered_once_by_the_same_command_run_again(store, tmp_path):
    from s3_server import _free_port

    down = f"http://127.0.0.1:{_free_port()}"  # nothing listens: MLflow down until the stage ended
    run = ExperimentTracker(store["uri"], "held-over").stage_run("round_1")
    first = tracking.ReportToMlflow(down, run)
    for step in (1, 2):
        first.after_report(None, [{"step": step, "train/loss": 1.0 / step}], None)
    assert pickle.loads(pickle.dumps(first)).deliver_pending() == 2  # the stage fails; the file stays

    # The same command again, MLflow back: the stage's new callback finds the run's file.
    again = tracking.ReportToMlflow(store["uri"], run)
    assert again.pending_file == first.pending_file
    again.after_report(None, [{"step": 3, "train/loss": 0.25}], None)
    assert pickle.loads(pickle.dumps(again)).deliver_pending() == 0 and not os.path.exists(first.pending_file)
    history = MlflowClient(store["uri"]).get_metric_history(run, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, 0.25)]  # each once

    # A run again with nothing left to train sends no report: the driver delivers the file.
    held = tracking.ReportToMlflow(down, run)
    held.after_report(None, [{"step": 4, "train/loss": 0.2}], None)
    assert tracking.ReportToMlflow(store["uri"], run).deliver_pending() == 0
    assert len(MlflowClient(store["uri"]).get_metric_history(run, "train/loss")) == 4


def test_pseudo_label_statistics_lineage_and_previews(store, tmp_path):
    previews = []
    for i in range(2):
        path = tmp_path / f"{i:05d}_frame{i}.png"
        Image.fromarray(np.full((8, 16, 3), 40 * i, np.uint8)).save(path)
        previews.append(str(path))
    manifest = manifest_with_statistics(previews)
    tracker = ExperimentTracker(store["uri"], "pseudo")
    run = tracker.stage_run("round_2")
    tracker.log_pseudo_labels(run, manifest, images_per_s=12.5)

    client = MlflowClient(store["uri"])
    data = client.get_run(run).data
    assert set(data.metrics) <= documented_metric_names()
    assert data.metrics["pseudo/coverage"] == pytest.approx(0.5)
    assert data.metrics["pseudo/precision"] == pytest.approx(manifest["statistics"]["precision_all"])
    assert data.metrics["pseudo/images_per_s"] == 12.5 and data.metrics["pseudo/num_images"] == 10
    assert data.metrics["pseudo/coverage/road"] == pytest.approx(0.5)
    assert data.metrics["pseudo/precision/traffic light"] == pytest.approx(0.9, abs=0.02)
    assert data.metrics["pseudo/threshold/bicycle"] == pytest.approx(0.95)
    assert data.metrics["pseudo/confidence/bicycle"] == pytest.approx(0.99)
    assert "pseudo/confidence/pole" not in data.metrics  # kept no pixel: no confidence
    assert "pseudo/coverage/pole" not in data.metrics and "pseudo/precision/pole" not in data.metrics  # None
    assert data.params["generator.checkpoint"] == "s3://bucket/round_1/checkpoint.pt"
    assert data.params["generator.round"] == "1" and data.params["pseudo.round"] == "2"
    assert data.params["pseudo.selector.alpha"] == "0.2" and data.params["pseudo.selector.name"] == "ias"
    assert _artifacts(client, run, "previews") == ["00000_frame0.png", "00001_frame1.png"]

    warmup_generated = tracker.stage_run("round_1")
    tracker.log_pseudo_labels(warmup_generated, {**manifest, "round": 1, "previews": []}, generator_round=0)
    assert client.get_run(warmup_generated).data.params["generator.round"] == "0"

    with pytest.raises(FileNotFoundError, match="missing.png"):
        tracker.log_files(run, [str(tmp_path / "missing.png")], "previews")


def test_comparison_table_reads_the_runs_from_mlflow(store, capsys):
    tracker = ExperimentTracker(store["uri"], "compare")
    ids = {}
    for i, stage in enumerate(["oracle", "round_2", "source_only", "final_eval", "round_10", "round_1"]):
        run = ids[stage] = tracker.stage_run(stage)  # created out of order: the table sorts by stage
        tracker.log_validation(run, {"val/mIoU-19": 0.3 + i / 100})
        if stage.startswith("round_"):
            tracker.log_metrics(run, {"pseudo/coverage": 0.6, "pseudo/precision": 0.875})
        tracker.set_tags(run, checkpoint_uri=f"s3://bucket/{stage}/checkpoint.pt")
        tracker.finish(run)

    table = comparison_table(store["uri"], "compare")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "stage" not in line]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[0] for c in cells] == ["source_only", "round_1", "round_2", "round_10", "final_eval", "oracle"]
    assert cells[0] == ["source_only", "32.00", "-", "-", "s3://bucket/source_only/checkpoint.pt"]
    assert cells[1] == ["round_1", "35.00", "60.00", "87.50", "s3://bucket/round_1/checkpoint.pt"]

    assert _artifacts(MlflowClient(store["uri"]), ids["round_1"], "charts") == ["val_iou.png"]

    import compare_rounds

    compare_rounds.main(["--tracking-uri", store["uri"], "--experiment", "compare"])
    assert capsys.readouterr().out.strip() == table
    with pytest.raises(SystemExit):
        compare_rounds.main(["--tracking-uri", store["uri"], "--experiment", "nope"])
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_the_parent_run_holds_the_rounds_as_step_indexed_series_and_the_final_figures(store):
    tracker = ExperimentTracker(store["uri"], "summary", run_name="summary: IAST, 3 rounds",
                                tags={"method": "IAST", "rounds": 3}, color="#2272b4")
    client = MlflowClient(store["uri"])
    parent = tracker.parent_run_id
    figures = {"source_only": 0.30, "adversarial": 0.34, "round_1": 0.38, "round_2": 0.41, "round_3": 0.40,
               "final_eval": 0.42, "oracle": 0.65}
    for stage, miou in figures.items():
        run = tracker.stage_run(stage)
        tracker.log_validation(run, {"mIoU-19": miou, "mIoU-16": miou + 0.01, "IoU/road": 0.8})
        tracker.log_metrics(run, {"train/loss": 1.0}, step=5)
        if stage.startswith("round_"):
            r = int(stage.split("_")[1])
            tracker.log_metrics(run, {"pseudo/precision": 0.9 - r / 100, "pseudo/coverage": 0.2 + r / 10})
        tracker.finish(run)
        if stage == "adversarial":  # the warm-up alone: step 0 is not known to be final yet
            assert not client.get_run(parent).data.metrics
    failed = tracker.stage_run("round_4")  # a failed stage adds no point
    tracker.log_validation(failed, {"mIoU-19": 0.99})
    tracker.finish(failed, "FAILED")

    assert _history(client, parent, "rounds/val/mIoU-19") == [
        (0, pytest.approx(0.34)), (1, pytest.approx(0.38)), (2, pytest.approx(0.41)), (3, pytest.approx(0.40))]
    assert [s for s, _ in _history(client, parent, "rounds/val/mIoU-16")] == [0, 1, 2, 3]
    assert _history(client, parent, "rounds/pseudo/precision") == [
        (1, pytest.approx(0.89)), (2, pytest.approx(0.88)), (3, pytest.approx(0.87))]
    assert _history(client, parent, "rounds/pseudo/coverage") == [
        (1, pytest.approx(0.3)), (2, pytest.approx(0.4)), (3, pytest.approx(0.5))]
    metrics = client.get_run(parent).data.metrics
    assert metrics["final/val/mIoU-19"] == pytest.approx(0.42) and metrics["final/val/mIoU-16"] == pytest.approx(0.43)
    assert "final/val/IoU/road" not in metrics  # per class on the final_eval run: a short compare table
    assert metrics["oracle/val/mIoU-19"] == pytest.approx(0.65)
    assert not any(k.startswith(("train/", "rounds/train")) for k in metrics)
    before = {k: _history(client, parent, k) for k in metrics}
    tracker.log_summary()  # a re-run (every stage skipped) logs it again: nothing new
    ExperimentTracker(store["uri"], "summary", run_name="summary: IAST, 3 rounds").log_summary()
    assert {k: _history(client, parent, k) for k in metrics} == before

    run = client.get_run(parent)
    assert run.info.run_name == "summary: IAST, 3 rounds"
    assert run.data.tags["method"] == "IAST" and run.data.tags["rounds"] == "3"
    assert run.data.tags["mlflow.runColor"] == "#2272b4"
    client.set_tag(parent, "mlflow.runColor", "#000000")  # a colour chosen in the UI is kept
    again = ExperimentTracker(store["uri"], "summary", run_name="summary: IAST, 3 rounds", color="#2272b4")
    assert again.parent_run_id == parent and client.get_run(parent).data.tags["mlflow.runColor"] == "#000000"


def test_rounds_from_a_model_trained_elsewhere_start_their_curve_at_the_given_figures(store):
    tracker = ExperimentTracker(store["uri"], "summary-variant")
    tracker.log_start({"val/mIoU-19": 0.34, "source_val/mIoU-19": 0.9, "pseudo/precision": None})
    run = tracker.stage_run("round_1")
    tracker.log_validation(run, {"mIoU-19": 0.37})
    tracker.finish(run)
    tracker.log_start({"val/mIoU-19": 0.34})  # again (a re-run): no second point
    client = MlflowClient(store["uri"])
    assert _history(client, tracker.parent_run_id, "rounds/val/mIoU-19") == [
        (0, pytest.approx(0.34)), (1, pytest.approx(0.37))]
    assert set(client.get_run(tracker.parent_run_id).data.metrics) == {"rounds/val/mIoU-19"}

    # A store from before the parent held the series: its round finished, the re-run skips it.
    old = ExperimentTracker(store["uri"], "summary-old-store")
    run = old.stage_run("round_1")
    old.log_validation(run, {"mIoU-19": 0.37})
    client.set_terminated(run, "FINISHED")  # as the earlier code finished it: no summary
    assert not client.get_run(old.parent_run_id).data.metrics
    ExperimentTracker(store["uri"], "summary-old-store").log_start({"val/mIoU-19": 0.34})
    assert _history(client, old.parent_run_id, "rounds/val/mIoU-19") == [
        (0, pytest.approx(0.34)), (1, pytest.approx(0.37))]


def test_a_parent_named_after_the_experiment_alone_is_taken_over_and_renamed(store):
    old = ExperimentTracker(store["uri"], "legacy")  # stores written before the run names said the method
    round_1 = old.stage_run("round_1")
    seed_2 = ExperimentTracker(store["uri"], "legacy", run_name="legacy-seed2")
    assert seed_2.parent_run_id != old.parent_run_id  # another run name: another parent
    new = ExperimentTracker(store["uri"], "legacy", run_name="legacy: CBST, 2 rounds", tags={"method": "CBST"},
                            old_run_name="legacy")
    assert new.parent_run_id == old.parent_run_id and new.stage_run("round_1") == round_1
    run = MlflowClient(store["uri"]).get_run(new.parent_run_id)
    assert run.info.run_name == "legacy: CBST, 2 rounds" and run.data.tags["method"] == "CBST"
    other = ExperimentTracker(store["uri"], "legacy", run_name="legacy: IAST, 2 rounds", old_run_name="legacy")
    assert other.parent_run_id != new.parent_run_id  # a renamed parent is not taken over twice


def test_the_jobs_name_and_tag_the_parent_run_by_method_and_rounds(tmp_path):
    import common  # jobs/common.py

    from pipeline import config
    from pipeline.experiment import ConsistencyConfig, ExperimentConfig

    cfg = config.load(ExperimentConfig, "configs/benchmark.yaml", [f"output={tmp_path / 'out'}"])
    rounds = len(cfg.self_training.rounds)
    assert common.method_name(cfg) == "IAST"
    tracker = common.experiment_tracker(cfg)
    run = MlflowClient(tracker.tracking_uri).get_run(tracker.parent_run_id)
    assert run.info.run_name == f"benchmark: IAST, {rounds} rounds"
    assert run.data.tags["method"] == "IAST" and run.data.tags["rounds"] == str(rounds)
    assert run.data.params["self_training.selector"] == "ias"
    assert run.data.tags["mlflow.runColor"] == common.method_color("IAST") != common.method_color("HIAST")

    st = cfg.self_training
    named = {
        "HIAST": dataclasses.replace(st, consistency=ConsistencyConfig()),
        "HIAST ": dataclasses.replace(st, hard_classes=14),
        "CBST": dataclasses.replace(st, selector="cbst"),
        "constant threshold 0.9": dataclasses.replace(st, selector="constant", constant_threshold=0.9),
        "IAST (ground truth labels)": dataclasses.replace(st, label_values="ground_truth"),
    }
    for name, changed in named.items():
        assert common.method_name(dataclasses.replace(cfg, self_training=changed)) == name.strip()
