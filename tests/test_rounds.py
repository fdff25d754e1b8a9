import json
import os

import compare_methods  # jobs/compare_methods.py
import confusions  # jobs/confusions.py: conftest puts jobs/ on the path
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from pipeline import config, pseudo_label
from pipeline.data.datasets import load_image
from pipeline.experiment import ExperimentConfig
from pipeline.label_store import LabelStore
from pipeline.rounds import (
    STAGES_FIGURE,
    StageRecord,
    final_lines,
    preconditions,
    read_record,
    run_experiment,
    run_round,
    run_warmup,
)
from pipeline.tracking import ExperimentTracker, comparison_table, default_tracking_uri


def tiny_experiment(benchmark_data, output, **overrides) -> ExperimentConfig:
    """A whole IAST chain in seconds: 4 source-only steps, 2 rounds of 2 steps."""
    data = {
        "name": "tiny",
        "output": str(output),
        "data": {k: config.to_dict(benchmark_data[k]) for k in ("source", "target", "val")},
        "model": {"arch": "deeplabv2_small"},
        "crop_size": [64, 32],
        "source_crop_heights": [48, 96],
        "target_crop_heights": [48, 96],
        "source_only": {"iterations": 4, "lr": 1e-3, "batch_size": 2, "checkpoint_every": 2},
        "self_training": {
            "iterations": 2, "batch_size": 2, "checkpoint_every": 2,
            "rounds": [
                {"alpha": 0.2, "lr": 1e-4, "pseudo_label_size": [128, 64]},
                {"alpha": 0.25, "lr": 1e-4, "pseudo_label_size": [128, 64]},
            ],
        },
        "compute": {"loader_workers": 0},
    }
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config.from_dict(ExperimentConfig, data)


def _tracker(cfg):
    return ExperimentTracker(default_tracking_uri(cfg.output), cfg.name)


def test_chain_is_tracked_and_a_rerun_does_no_work(ray_cluster, benchmark_data, tmp_path, capsys):
    cfg = tiny_experiment(benchmark_data, tmp_path / "out",
                          **{"data.source_val": config.to_dict(benchmark_data["source_val"])})
    tracker = _tracker(cfg)
    records = run_experiment(cfg, tracker)
    assert [r.stage for r in records] == ["source_only", "round_1", "round_2", "final_eval"]
    # the source model on the held-out source frames (precondition P1), beside its target val figure
    held_out = records[0].metrics["source_val/mIoU-19"]
    assert 0 <= held_out <= 1 and held_out != records[0].metrics["val/mIoU-19"]
    assert "source_val/IoU/road" in records[0].metrics
    r1, r2 = records[1], records[2]
    assert r1.lineage["generator"] == records[0].checkpoint  # round 1 labels with the warm-up
    assert r2.lineage["generator"] == r1.checkpoint and r2.lineage["init"] == r1.checkpoint
    assert 0 <= r2.metrics["val/mIoU-19"] <= 1 and "pseudo/coverage" in r2.metrics

    client = MlflowClient(tracker.tracking_uri)
    runs = client.search_runs([tracker.experiment_id])
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert set(by_stage) == {"experiment", "source_only", "round_1", "round_2", "final_eval"}
    assert by_stage["source_only"].data.metrics["source_val/mIoU-19"] == pytest.approx(held_out)
    round_1 = by_stage["round_1"].data
    assert "val/mIoU-19" in round_1.metrics and "val/IoU/road" in round_1.metrics
    assert "pseudo/coverage" in round_1.metrics and "pseudo/threshold/road" in round_1.metrics
    assert "train/loss" in round_1.metrics and "train/ignored_reg" in round_1.metrics
    assert round_1.tags["checkpoint_uri"] == r1.checkpoint
    assert round_1.params["pseudo.selector.alpha"] == "0.2"
    assert "round_2" in comparison_table(tracker.tracking_uri, "tiny")

    # the stages side by side on target val images: image | source_only | round_1 | round_2 | ground truth
    figure = tmp_path / "out" / STAGES_FIGURE
    val_width = load_image(cfg.data.val.samples()[0].image).shape[1]
    assert Image.open(figure).width > 5 * val_width
    parent = by_stage["experiment"].info.run_id
    assert [a.path for a in client.list_artifacts(parent, "figures")] == ["figures/stages_on_val.png"]

    # a finished chain does nothing on a re-run: same records, no new runs, no new files
    stamp = {p: os.stat(p).st_mtime_ns for p in map(str, (tmp_path / "out").rglob("*.parquet"))}
    stamp[str(figure)] = os.stat(figure).st_mtime_ns
    again = run_experiment(cfg, _tracker(cfg))
    assert [r.__dict__ for r in again] == [r.__dict__ for r in records]
    assert len(client.search_runs([tracker.experiment_id])) == len(runs)
    assert {p: os.stat(p).st_mtime_ns for p in stamp} == stamp

    # the confusions job reads the finished stages back and names where each class's pixels go
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict(cfg)))
    assert confusions.main(["--config", str(config_file), "--stages", "source_only", "round_2"]) == 0
    out = capsys.readouterr().out
    assert f"round_2 ({r2.checkpoint}): val mIoU-19 {100 * r2.metrics['val/mIoU-19']:.2f}" in out
    assert "| class | IoU (%) | predicted as (% of the class's pixels) |" in out and "\n| road | " in out
    assert confusions.main(["--config", str(config_file), "--stages", "round_7"]) == 2
    assert "no finished stage round_7" in capsys.readouterr().err


def test_a_source_free_chain_runs_stvm_from_the_given_model_without_source_data(ray_cluster, benchmark_data,
                                                                                small_checkpoint, tmp_path):
    cfg = tiny_experiment(benchmark_data, tmp_path / "out", **{
        "data.source": None, "model.init": small_checkpoint, "source_only.iterations": 0,
        "self_training.rounds": [],
        "stvm": {"iterations": 2, "batch_size": 2, "checkpoint_every": 2, "metric_pixels": 64}})
    tracker = _tracker(cfg)
    records = run_experiment(cfg, tracker)
    assert [r.stage for r in records] == ["stvm", "final_eval"]
    assert records[0].lineage == {"init": small_checkpoint, "steps": 2}
    assert records[1].lineage == {"evaluated": "stvm", "report": "last", "protocol": "custom", "last_stage": "stvm"}
    assert records[1].checkpoint == records[0].checkpoint and "val/mIoU-19" in records[1].metrics
    assert "stvm/teacher_precision" in records[0].metrics
    runs = {r.data.tags["stage"]: r for r in tracker.client.search_runs([tracker.experiment_id])
            if "stage" in r.data.tags}
    assert runs["stvm"].data.metrics["train/reliability"] > 0
    parent = tracker.client.get_run(tracker.parent_run_id).data.metrics
    assert "rounds/val/mIoU-19" in parent  # step 1 of the parent's curve
    assert run_experiment(cfg, tracker)[0].checkpoint == records[0].checkpoint  # finished: not run again


def test_an_experiment_adapts_with_rounds_or_stvm_not_both(benchmark_data, tmp_path):
    with pytest.raises(ValueError, match="both set"):
        tiny_experiment(benchmark_data, tmp_path, **{"stvm": {"iterations": 2}})
    with pytest.raises(ValueError, match="no adaptation configured"):
        tiny_experiment(benchmark_data, tmp_path, **{"self_training.rounds": []})
    with pytest.raises(ValueError, match="data.source is empty"):
        tiny_experiment(benchmark_data, tmp_path, **{"data.source": None, "self_training.rounds": [],
                                                    "stvm": {"iterations": 2}})
    with pytest.raises(ValueError, match="stvm.proxy_scale"):
        tiny_experiment(benchmark_data, tmp_path, **{"self_training.rounds": [],
                                                    "stvm": {"iterations": 2, "proxy_scale": 0}})
    for path in ("configs/gta5_cityscapes_stvm.yaml", "configs/synthia_cityscapes_stvm.yaml",
                 "configs/cityscapes_nthu_stvm.yaml"):
        cfg = config.load(ExperimentConfig, path, [f"output={tmp_path / 'o'}", "model.init=/w/source.pt"])
        train = cfg.stvm_train_config("/w/source.pt")
        assert cfg.source_free and cfg.data.source is None and train.stage == "stvm"
        assert train.init == "/w/source.pt" and train.source is None and train.label_store is None
        assert train.stvm.teacher_momentum == cfg.stvm.teacher_momentum and train.iterations == cfg.stvm.iterations
    nthu = config.load(ExperimentConfig, "configs/cityscapes_nthu_stvm.yaml", [f"output={tmp_path / 'o'}"])
    iast = config.load(ExperimentConfig, "configs/cityscapes_nthu.yaml", [f"output={tmp_path / 'i'}"])
    assert nthu.label_space == iast.label_space == "nthu13" and nthu.data.target == iast.data.target
    assert nthu.stvm.iterations == sum(iast.self_training.iterations for _ in iast.self_training.rounds)


def test_round_resumes_from_a_complete_label_store_without_relabelling(ray_cluster, benchmark_data, tmp_path):
    cfg = tiny_experiment(benchmark_data, tmp_path / "out", **{"self_training.rounds": [
        {"alpha": 0.2, "lr": 1e-4, "pseudo_label_size": [128, 64]}]})
    tracker = _tracker(cfg)
    warmup = run_warmup(cfg, tracker)[-1]
    # the round crashed after its labels were complete: the store exists, training did not finish
    pseudo_label.run(cfg.round_label_config(1, warmup.checkpoint))
    store = LabelStore(cfg.label_store(1))
    manifest_mtime = os.stat(os.path.join(cfg.label_store(1), "manifest.json")).st_mtime_ns
    record = run_round(cfg, 1, tracker)
    assert os.stat(os.path.join(cfg.label_store(1), "manifest.json")).st_mtime_ns == manifest_mtime
    assert store.manifest()["prediction_parts_reused"] == 0  # made once, by the first call
    assert record.lineage["label_store"] == cfg.label_store(1)
    assert read_record(cfg, "round_1") == record


def test_round_before_its_predecessor_is_refused(benchmark_data, tmp_path):
    cfg = tiny_experiment(benchmark_data, tmp_path / "out")
    with pytest.raises(RuntimeError, match="has not finished"):
        run_round(cfg, 2, tracker=None)


def test_unknown_experiment_keys_are_rejected(benchmark_data, tmp_path):
    with pytest.raises(config.ConfigError, match="self_training.alpah"):
        tiny_experiment(benchmark_data, tmp_path, **{"self_training.alpah": 0.3})
    with pytest.raises(config.ConfigError, match="self_training.rounds\\[0\\].alpha: expected float"):
        tiny_experiment(benchmark_data, tmp_path, **{"self_training.rounds": [{"alpha": "high", "lr": 1,
                                                                                "pseudo_label_size": [2, 1]}]})


def test_experiment_checks_every_dataset_and_weights_file_before_any_work(benchmark_data, tmp_path):
    cfg = tiny_experiment(benchmark_data, tmp_path / "out", **{"data.val.root": str(tmp_path / "nowhere")})
    with pytest.raises(config.ConfigError, match="prepare_data.py"):
        run_experiment(cfg, tracker=None)
    cfg = tiny_experiment(benchmark_data, tmp_path / "out", **{"model.imagenet_backbone": str(tmp_path / "r101.pth")})
    with pytest.raises(config.ConfigError, match="r101.pth not found"):
        run_experiment(cfg, tracker=None)
    assert not (tmp_path / "out").exists()  # nothing was started


def test_backbone_lr_multiplier_reaches_every_training_stage(benchmark_data, tmp_path):
    from pipeline.train import _build

    cfg = tiny_experiment(benchmark_data, tmp_path / "out", **{"model.backbone_lr_mult": 1.0,
                                                                "oracle": {"iterations": 4, "lr": 1e-3}})
    for stage in (cfg.warmup_config("source_only", None), cfg.warmup_config("oracle", None),
                  cfg.round_train_config(1, init=None)):
        assert stage.backbone_lr_mult == 1.0
        _, optimizer, _ = _build(stage)
        assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {"backbone": stage.lr, "classifier": stage.lr}
    default = tiny_experiment(benchmark_data, tmp_path / "out").warmup_config("source_only", None)
    _, optimizer, _ = _build(default)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups}["backbone"] == pytest.approx(0.1 * default.lr)
    with pytest.raises(ValueError, match="model.backbone_lr_mult must be > 0"):
        tiny_experiment(benchmark_data, tmp_path / "out", **{"model.backbone_lr_mult": 0.0})


def test_oracle_starts_from_the_backbone_not_from_the_warm_up_checkpoint(benchmark_data, tmp_path):
    cfg = tiny_experiment(benchmark_data, tmp_path / "out", **{
        "model.init": str(tmp_path / "warmup.pt"), "model.imagenet_backbone": str(tmp_path / "r101.pth"),
        "oracle": {"iterations": 4, "lr": 1e-3}})
    source_only, oracle = cfg.warmup_config("source_only", None), cfg.warmup_config("oracle", None)
    assert source_only.init == str(tmp_path / "warmup.pt")
    assert oracle.init is None and oracle.imagenet_backbone == str(tmp_path / "r101.pth")


def test_ablation_has_the_true_class_upper_bound_and_the_setting_is_checked(benchmark_data, tmp_path):
    from pipeline.rounds import StageRecord, ablation_configs

    cfg = tiny_experiment(benchmark_data, tmp_path / "out")
    assert cfg.round_label_config(1, "g.pt").selector.label_values == "prediction"  # the method by default
    variants = ablation_configs(cfg, StageRecord("source_only", str(tmp_path / "w.pt"), {}))
    label_values = {name: v.round_label_config(1, "g.pt").selector.label_values for name, v in variants.items()}
    assert [n for n, v in label_values.items() if v == "ground_truth"] == ["IAS pixels, true classes (upper bound)"]
    upper = variants["IAS pixels, true classes (upper bound)"]
    assert upper.round_label_config(1, "g.pt").selector.name == "ias"
    assert upper.output != variants["IAS"].output
    with pytest.raises(config.ConfigError, match="self_training.label_values"):
        tiny_experiment(benchmark_data, tmp_path, **{"self_training.label_values": "truth"})


def test_method_configs_differ_only_in_hiast_settings_and_seed(benchmark_data, tmp_path):
    from pipeline.rounds import METHODS, SOURCE_FREE, StageRecord, method_configs

    cfg = tiny_experiment(benchmark_data, tmp_path / "out")
    variants = method_configs(cfg, StageRecord("source_only", str(tmp_path / "w.pt"), {}), seeds=2)
    assert sorted(variants) == sorted((m, s) for m in [*METHODS, SOURCE_FREE] for s in (cfg.seed, cfg.seed + 1))
    assert len({v.output for v in variants.values()}) == len({v.name for v in variants.values()}) == 8
    for seed in (cfg.seed, cfg.seed + 1):  # STvM: one source-free stage as long as all the rounds
        stvm = variants.pop((SOURCE_FREE, seed))
        assert stvm.source_free and not stvm.self_training.rounds and stvm.seed == seed
        assert stvm.stvm.iterations == len(cfg.self_training.rounds) * cfg.self_training.iterations
        train = stvm.stvm_train_config(str(tmp_path / "w.pt"))
        assert train.stage == "stvm" and train.source is None and train.label_store is None
    for (method, seed), variant in variants.items():
        train = variant.round_train_config(2, "r1.pt")  # every round is kept
        assert variant.seed == train.seed == seed and variant.model.init == str(tmp_path / "w.pt")
        assert variant.source_only.iterations == 0 and variant.oracle.iterations == 0
        hiast = method.startswith("HIAST")
        assert (train.teacher_momentum == 0.999) if hiast else (train.teacher_momentum is None)
        assert train.hard_classes == (14 if "paste" in method else 0)
        assert variant.round_label_config(2, "g.pt").selector == cfg.round_label_config(2, "g.pt").selector


def test_variants_from_a_released_warm_up_label_with_its_best_and_start_from_its_last(benchmark_data, tmp_path):
    from pipeline.rounds import StageRecord, method_configs

    cfg = tiny_experiment(benchmark_data, tmp_path / "out", **{
        "adversarial": {"iterations": 4, "batch_size": 2, "val_every": 2},
        "chain": {"round1_generator": "best", "round1_init": "last"}})
    warmup = StageRecord("adversarial", "/w/last.pt", {"best/step": 2}, checkpoints={"best": "/w/best.pt"})
    for variant in method_configs(cfg, warmup, seeds=1).values():
        assert (variant.model.init, variant.model.generator_init) == ("/w/last.pt", "/w/best.pt")
        assert variant.chain.round1_generator == "last"
        variant.check_chain()  # the given warm-up files need no choice of their own


def test_compare_methods_job_trains_each_method_and_prints_the_table(ray_cluster, benchmark_data, tmp_path, capsys):
    cfg = tiny_experiment(benchmark_data, tmp_path / "out")
    path = tmp_path / "tiny.yaml"
    data = config.to_dict(cfg)
    data["self_training"]["rounds"] = data["self_training"]["rounds"][:1]
    data["self_training"]["selector"] = "cbst"  # keeps pixels of a 4-step model, so precision is defined
    path.write_text(yaml.safe_dump(data))
    assert compare_methods.main(["--config", str(path), "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| IAST") or line.startswith("| HIAST")]
    assert len(rows) == 6 and all(len(row.split("|")) == 5 for row in rows[:3])  # method, round 1, gain
    stvm = [line for line in out.splitlines() if line.startswith("| STvM")]
    assert len(stvm) == 1 and float(stvm[0].split("|")[2].strip()) > 0  # under the last (here the only) round
    assert "STvM's teacher labels" in out
    precision_coverage = [row.split("|")[2].split("/") for row in rows[3:]]  # method, round 1's "p / c"
    assert all(0 <= float(p) <= 100 and 0 <= float(c) <= 100 for p, c in precision_coverage)
    client = MlflowClient(default_tracking_uri(cfg.output))
    for name, consistency in (("tiny-iast-seed888", False), ("tiny-hiast_ema_teacher_strong_views_consistency-seed888", True)):
        experiment = client.get_experiment_by_name(name)
        run = client.search_runs([experiment.experiment_id], "tags.stage = 'round_1'")[0]
        assert ("train/consistency" in run.data.metrics) == consistency


def test_warm_up_without_stages_starts_the_rounds_from_the_given_model(benchmark_data, tmp_path):
    from pipeline.rounds import warm_up

    given = tmp_path / "warmup.pt"
    cfg = tiny_experiment(benchmark_data, tmp_path / "out", **{
        "source_only.iterations": 0, "model.init": str(given)})
    record = warm_up(cfg, _tracker(cfg))  # nothing to train: no Ray needed
    assert record.checkpoint == str(given) and record.metrics == {}
    with pytest.raises(ValueError, match="model.init"):
        warm_up(tiny_experiment(benchmark_data, tmp_path / "out2", **{"source_only.iterations": 0}), None)


def test_a_released_iast_init_is_converted_once_for_the_later_stages(benchmark_data, tmp_path, monkeypatch):
    import torch

    from pipeline import rounds
    from pipeline.models import build_model, load_checkpoint
    from pipeline.rounds import warmup_record

    torch.manual_seed(0)
    released = build_model("deeplabv2_small", 19)
    state = {"module." + k.replace("classifier.convs.", "decoder.aspp.conv2d_list."): v
             for k, v in released.state_dict().items()}  # named as the released code saves it
    given = tmp_path / "G_gtav_at_warmup.pth"
    torch.save(state, given)
    cfg = tiny_experiment(benchmark_data, tmp_path / "out", **{
        "source_only.iterations": 0, "model.init": str(given), "model.init_format": "iast"})

    start = warmup_record(cfg).checkpoint  # round 1 labels with and trains from this one
    assert start == cfg.round_label_config(1, start).checkpoint == cfg.round_train_config(1, start).init
    loaded = build_model("deeplabv2_small", 19)
    load_checkpoint(loaded, start)  # the normal loader of pseudo-labelling and training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in released.state_dict().items())
    assert start.startswith(cfg.output) and warmup_record(cfg).lineage["given"] == str(given)
    mtime = os.stat(start).st_mtime_ns
    assert warmup_record(cfg).checkpoint == start and os.stat(start).st_mtime_ns == mtime  # converted once

    # the adversarial warm-up starts from the same converted file (its run is not started here)
    adversarial = tiny_experiment(benchmark_data, tmp_path / "out", **{
        "source_only.iterations": 0, "model.init": str(given), "model.init_format": "iast",
        "adversarial": {"iterations": 2, "batch_size": 2}})
    starts = []
    monkeypatch.setattr(rounds, "run_training_stage",
                        lambda cfg, stage, tracker, init, **kw: starts.append(init) or rounds.StageRecord(stage, init))
    rounds.run_warmup(adversarial, tracker=None)
    assert starts == [start]


def test_the_released_warm_up_files_label_and_start_round_1_apart(benchmark_data, small_checkpoint, tmp_path,
                                                                  monkeypatch):
    """model.generator_init (the released G file) labels round 1; model.init (M) starts it."""
    from pipeline import rounds

    weights = tmp_path / "M.pt"
    weights.write_bytes(open(small_checkpoint, "rb").read())
    cfg = tiny_experiment(benchmark_data, tmp_path / "out", **{
        "source_only.iterations": 0, "model.init": str(weights), "model.generator_init": small_checkpoint})
    seen = {}

    def labels(label_cfg):
        seen["generator"] = label_cfg.checkpoint
        return {"prediction_parts_reused": 0, "num_parts": 1, "num_images": 1,
                "statistics": {"coverage_all": 0.5, "precision_all": None}}

    def training(cfg, stage, run_id, tracker, train_cfg):
        seen["init"] = train_cfg.init
        return rounds.StageRecord(stage, "/trained.pt")

    monkeypatch.setattr(rounds.pseudo_label, "run", labels)
    monkeypatch.setattr(rounds, "_train_tracked", training)
    tracker = _tracker(cfg)
    monkeypatch.setattr(tracker, "log_pseudo_labels", lambda *a, **kw: None)
    record = rounds.run_round(cfg, 1, tracker)
    assert seen == {"generator": small_checkpoint, "init": str(weights)}
    assert record.lineage["generator_checkpoint"] == "model.generator_init"
    assert record.lineage["init_stage"] == "warmup" and record.lineage["init_checkpoint"] == "last"
    with pytest.raises(ValueError, match="set model.init too"):
        tiny_experiment(benchmark_data, tmp_path / "o2", **{"model.generator_init": small_checkpoint})


def test_a_stage_finished_on_other_data_is_not_reused(benchmark_data, tmp_path):
    import shutil

    from pipeline.data.prepare import prepare
    from pipeline.rounds import StageRecord, _write_record

    target = tmp_path / "target"
    shutil.copytree(benchmark_data["root"] / "target", target)
    cfg = tiny_experiment(benchmark_data, tmp_path / "out", **{"data.target.root": str(target),
                                                                "data.val.root": str(target)})
    record = _write_record(cfg, StageRecord("round_1", str(tmp_path / "r1.pt"), {"val/mIoU-19": 0.25}))
    assert set(record.data) == {"source", "target", "val"}
    assert read_record(cfg, "round_1") == record

    # the target's train images are re-generated and prepared again: the round is stale
    frame = cfg.data.target.samples()[0].image
    with open(frame, "rb") as f:
        image = f.read()
    generated = sorted(target.rglob("*_leftImg8bit.png"))
    other = next(p for p in generated if str(p) != frame and "train" in p.parts)
    shutil.copyfile(other, frame)
    prepare("cityscapes", str(target), workers=1)
    with pytest.raises(RuntimeError, match=r"stage round_1 finished on other data than data\.target \(.*target\)"):
        read_record(cfg, "round_1")

    with open(frame, "wb") as f:  # the original frame back: the record is current again
        f.write(image)
    prepare("cityscapes", str(target), workers=1)
    assert read_record(cfg, "round_1") == record


def test_preconditions_report_what_the_records_show():
    def rec(stage, **metrics):
        return StageRecord(stage, f"{stage}.pt", {k.replace("__", "/"): v for k, v in metrics.items()})

    records = [rec("source_only", **{"val__mIoU-19": 0.36, "source_val__mIoU-19": 0.74}),
               rec("round_1", **{"val__mIoU-19": 0.45}), rec("round_2", **{"val__mIoU-19": 0.43}),
               rec("oracle", **{"val__mIoU-19": 0.66})]
    text = preconditions(records)
    assert "held-out source 74.00 (>= 70), oracle on target val 66.00 (>= 65): met" in text
    assert "36.00 / 66.00 = 0.55 (in 0.45-0.65): met" in text
    assert "last round 23%, best round 30% of source-only -> oracle" in text
    records[0].metrics["source_val/mIoU-19"] = 0.55
    records[0].metrics["val/mIoU-19"] = 0.50
    text = preconditions(records)
    assert "P1 learnable" in text and text.count("NOT met") == 2
    assert preconditions([rec("source_only", **{"val__mIoU-19": 0.3})]) == ""  # nothing to compare with


@pytest.mark.slow  # about 2 minutes here: five stages, each validating twice
def test_the_released_chain_takes_the_configured_checkpoints(ray_cluster, benchmark_data, tmp_path):
    """The released protocol on tiny data: periodic validation, best and kept steps, and
    each link's checkpoint, read back from the stage records."""
    cfg = tiny_experiment(benchmark_data, tmp_path / "out", **{
        "source_only.val_every": 2, "source_only.val_size": [64, 32],
        "adversarial": {"iterations": 2, "lr": 1e-4, "batch_size": 2, "checkpoint_every": 2},
        "self_training.iterations": 4, "self_training.val_every": 2, "self_training.cosine_period": 1.5,
        "self_training.instance_size": 2, "self_training.label_order": "released_permutation",
        "chain": {"adversarial_init": "best", "round1_generator": "last", "round1_init": "last",
                  "generator": 1, "init": 3, "report": "best"},
        "final_eval": {"flip": False, "report_flip": True},
        "lr_floor_of": "head", "protocol": "released",
    })
    records = {r.stage: r for r in run_experiment(cfg, _tracker(cfg))}
    source_only, adversarial = records["source_only"], records["adversarial"]
    assert source_only.metrics["best/step"] in (2, 4) and set(source_only.checkpoints) == {"best"}
    assert adversarial.lineage["init"] == source_only.checkpoints["best"]
    assert adversarial.lineage["init_step"] == source_only.metrics["best/step"]
    r1, r2 = records["round_1"], records["round_2"]
    assert (r1.lineage["generator"], r1.lineage["generator_stage"], r1.lineage["generator_step"]) == \
        (adversarial.checkpoint, "adversarial", 2)
    assert set(r1.checkpoints) == {"best", "step_1", "step_3"}  # what round 2 takes, kept beside the last
    assert (r2.lineage["generator"], r2.lineage["generator_step"]) == (r1.checkpoints["step_1"], 1)
    assert (r2.lineage["init"], r2.lineage["init_step"]) == (r1.checkpoints["step_3"], 3)
    assert set(r2.checkpoints) == {"best"}  # the last round keeps no steps
    # the headline is the best on val over both rounds, evaluated beside the last and with flip
    final = records["final_eval"]
    best_round = max((r1, r2), key=lambda r: r.metrics["best/val/mIoU-19"])
    assert final.lineage["report"] == "best" and final.lineage["best_stage"] == best_round.stage
    assert final.checkpoint == best_round.checkpoints["best"]
    assert final.metrics["val/mIoU-19"] == final.metrics["best/val/mIoU-19"]
    assert {"last/val/mIoU-19", "flip/val/mIoU-19"} <= set(final.metrics)
    summary = final_lines(cfg, list(records.values()))
    assert f"best on val ({best_round.stage}): {100 * final.metrics['best/val/mIoU-19']:.2f}" in summary
    assert "released protocol" in summary and "with flip" in summary
    runs = MlflowClient(default_tracking_uri(cfg.output)).search_runs(
        [_tracker(cfg).experiment_id], "tags.stage = 'round_2'")
    assert runs[0].data.params["lineage.init_step"] == "3"
    assert runs[0].data.params["train.cosine_period"] == "1.5"
