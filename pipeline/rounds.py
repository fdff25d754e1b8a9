"""The IAST chain: warm-up -> self-training rounds -> final evaluation, idempotent.

Every stage ends by writing a completion record (``stages/<stage>.json`` under the
experiment's output): its checkpoint URI, validation metrics and lineage. A stage with a
record is never run again; a stage without one resumes from what it left: the label
store keeps its finished parts (or is reused whole), Ray Train resumes from the run's
last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field

import numpy as np
import ray
import torch
from PIL import Image

from pipeline import config as config_lib
from pipeline import pseudo_label, storage, train
from pipeline.data.datasets import Sample, load_image, load_label
from pipeline.data.transforms import normalize
from pipeline.evaluation import ConfusionMatrix, predict_probs
from pipeline.experiment import ConsistencyConfig, ExperimentConfig
from pipeline.models import build_model, load_checkpoint, load_released_checkpoint, save_checkpoint
from pipeline.tracking import ExperimentTracker, default_tracking_uri
from pipeline.visualize import contact_sheet, fit_width, label_cells, save_png, side_by_side


@dataclass
class StageRecord:
    stage: str
    checkpoint: str
    metrics: dict = field(default_factory=dict)  # val/... (and pseudo/... for rounds)
    lineage: dict = field(default_factory=dict)  # where its weights and labels came from
    data: dict = field(default_factory=dict)  # the fingerprint of each data split it ran on
    # weights kept beside the last: "best" (on val) and "step_<N>" -> URI
    checkpoints: dict = field(default_factory=dict)


def pick_checkpoint(record: StageRecord, choice, link: str) -> tuple[str, int | None]:
    """(URI, step) of the checkpoint ``choice`` ("last", "best" or a step) of a finished
    stage, for the chain's ``link``; the step is None for a given file (model.init)."""
    if choice == "last":
        return record.checkpoint, record.lineage.get("steps")
    key = "best" if choice == "best" else f"step_{choice}"
    if key not in record.checkpoints:
        raise RuntimeError(f"{link} takes {choice!r} of {record.stage}, which finished without it (kept: "
                           f"{', '.join(record.checkpoints) or 'none'}); run {record.stage} again with the chain's "
                           "settings, or choose last")
    step = int(record.metrics["best/step"]) if choice == "best" else int(choice)
    return record.checkpoints[key], step


def _data_fingerprints(cfg: ExperimentConfig) -> dict:
    return {key: getattr(cfg.data, key).fingerprint() for key in ("source", "target", "val")
            if getattr(cfg.data, key) is not None}


def read_record(cfg: ExperimentConfig, stage: str) -> StageRecord | None:
    """The stage's completion record, or None when it has not finished. A record made
    from other data than the config's (a split re-generated or re-prepared since) is an
    error: its checkpoint and metrics would be silently reused for the new data."""
    uri = cfg.stage_record(stage)
    if not storage.exists(uri):
        return None
    record = StageRecord(**json.loads(storage.read_bytes(uri)))
    changed = [key for key, fingerprint in record.data.items()
               if getattr(cfg.data, key) is not None and getattr(cfg.data, key).fingerprint() != fingerprint]
    if changed:
        splits = ", ".join(f"data.{key} ({getattr(cfg.data, key).root})" for key in changed)
        raise RuntimeError(
            f"{uri}: stage {stage} finished on other data than {splits} holds now (the split was "
            f"re-generated or re-prepared since): write to a new output=..., or delete {cfg.output} "
            "to run every stage again"
        )
    return record


def _write_record(cfg: ExperimentConfig, record: StageRecord) -> StageRecord:
    record.data = _data_fingerprints(cfg)
    storage.write_bytes(cfg.stage_record(record.stage), json.dumps(record.__dict__, indent=2).encode())
    return record


def _val_metrics(metrics: dict) -> dict:
    """Validation metrics that are defined (NaN: a class absent from prediction and truth)."""
    return {k: v for k, v in metrics.items() if k.startswith("val/") and v is not None and math.isfinite(v)}


def _stage_metrics(metrics: dict) -> dict:
    """What a stage's record keeps: its validation, and a method's stage-level ``stvm/...``."""
    kept = {k: v for k, v in metrics.items() if k.startswith("stvm/") and v is not None and math.isfinite(v)}
    return {**_val_metrics(metrics), **kept}


# -- stages ---------------------------------------------------------------------------------


def _train_tracked(cfg: ExperimentConfig, stage: str, run_id: str, tracker: ExperimentTracker,
                   train_cfg: train.TrainConfig) -> StageRecord:
    reports = tracker.report_callback(run_id)
    result = train.fit(train_cfg, callbacks=[reports])
    reports.deliver_pending()  # what the callback could not send while MLflow was unreachable
    metrics = _val_metrics(result.metrics)
    if metrics:
        tracker.log_validation(run_id, metrics, step=train_cfg.iterations)
    tracker.set_tags(run_id, checkpoint_uri=result.checkpoint)
    best = {k: v for k, v in result.metrics.items() if k.startswith("best/") and v is not None and math.isfinite(v)}
    if best:
        tracker.log_metrics(run_id, best, step=train_cfg.iterations)
    return StageRecord(stage, result.checkpoint, {**_stage_metrics(result.metrics), **best},
                       checkpoints=dict(result.kept))


def run_training_stage(cfg: ExperimentConfig, stage: str, tracker: ExperimentTracker, init: str | None,
                       lineage: dict | None = None) -> StageRecord:
    """source_only, adversarial or oracle (idempotent)."""
    record = read_record(cfg, stage)
    if record is not None:
        return record
    train_cfg = cfg.warmup_config(stage, init)
    run_id = tracker.stage_run(stage)
    tracker.log_config(run_id, config_lib.to_dict(train_cfg))
    record = _train_tracked(cfg, stage, run_id, tracker, train_cfg)
    record.lineage = {"init": train_cfg.init or train_cfg.imagenet_backbone, "steps": train_cfg.iterations,
                      **(lineage or {})}
    if stage == "source_only" and cfg.data.source_val is not None:
        held_out = source_heldout_metrics(cfg, record.checkpoint)
        tracker.log_metrics(run_id, held_out, step=train_cfg.iterations)
        record.metrics.update(held_out)
    tracker.finish(run_id)
    return _write_record(cfg, record)


def given_checkpoint(cfg: ExperimentConfig, key: str = "init") -> str | None:
    """``model.init`` (or ``model.generator_init``) as a checkpoint of ours, for the stages
    that start from it when source-only is skipped. Only source-only reads another format
    (``model.init_format``); the adversarial stage, the rounds and pseudo-labelling load
    ours, so a released checkpoint (IAST's, AdaptSegNet's, AdvEnt's) is converted once
    into the output folder (its record, written after the file, marks the conversion
    complete; a different file converts again)."""
    given = getattr(cfg.model, key)
    if given is None or cfg.model.init_format == "ours":
        return given
    stage = "init" if key == "init" else "generator_init"
    record = read_record(cfg, stage)
    if record is None or record.lineage.get("given") != given:
        model = build_model(cfg.model.arch, cfg.num_classes)
        load_released_checkpoint(model, given, cfg.model.init_format)
        converted = storage.join(cfg.output, "init", f"{stage}.pt") if key != "init" else cfg.init_checkpoint
        save_checkpoint(converted, model, label_space=cfg.label_space)
        record = _write_record(cfg, StageRecord(stage, converted, lineage={
            "given": given, "format": cfg.model.init_format}))
    return record.checkpoint


def warmup_record(cfg: ExperimentConfig) -> StageRecord | None:
    """The record of the last warm-up stage (or of ``model.init`` when no warm-up is configured)."""
    for stage in ("adversarial", "source_only"):
        if getattr(cfg, stage).iterations > 0:
            return read_record(cfg, stage)
    if cfg.model.init is None:
        raise ValueError("no warm-up configured: set source_only.iterations, or model.init to a warm-up checkpoint")
    return StageRecord("warmup", given_checkpoint(cfg), {}, {"given": cfg.model.init})


def run_warmup(cfg: ExperimentConfig, tracker: ExperimentTracker) -> list[StageRecord]:
    """Source-only, then the adversarial warm-up, as configured (each skipped when finished)."""
    records = []
    if cfg.source_only.iterations > 0:
        records.append(run_training_stage(cfg, "source_only", tracker, init=None))
    if cfg.adversarial.iterations > 0:
        lineage = {}
        if records:
            start, step = pick_checkpoint(records[-1], cfg.chain.adversarial_init, "adversarial")
            lineage = {"init_stage": "source_only", "init_checkpoint": cfg.chain.adversarial_init, "init_step": step}
        else:
            start = given_checkpoint(cfg)
        if start is None:
            raise ValueError("the adversarial warm-up needs a source-only model: set source_only.iterations "
                             "or model.init")
        records.append(run_training_stage(cfg, "adversarial", tracker, init=start, lineage=lineage))
    return records


def warm_up(cfg: ExperimentConfig, tracker: ExperimentTracker) -> StageRecord:
    """Runs the configured warm-up stages; returns the record the rounds start from (the
    last stage's, or ``model.init``'s when no warm-up stage is configured)."""
    run_warmup(cfg, tracker)
    return warmup_record(cfg)


def run_round(cfg: ExperimentConfig, round_index: int, tracker: ExperimentTracker) -> StageRecord:
    """One IAST round: pseudo-labels (Ray Data) -> self-training (Ray Train) -> validation."""
    if not 1 <= round_index <= len(cfg.self_training.rounds):
        raise ValueError(f"round {round_index} is not configured (self_training.rounds has "
                         f"{len(cfg.self_training.rounds)})")
    stage = f"round_{round_index}"
    record = read_record(cfg, stage)
    if record is not None:
        return record
    warmup = warmup_record(cfg)
    previous = warmup if round_index == 1 else read_record(cfg, f"round_{round_index - 1}")
    if previous is None:
        needed = "the warm-up" if round_index == 1 else f"round {round_index - 1}"
        raise RuntimeError(
            f"round {round_index} starts from {needed}, which has not finished: run the stages in order "
            "with jobs/run_experiment.py (finished stages are skipped)"
        )
    st = cfg.self_training
    lineage = {"label_store": cfg.label_store(round_index)}
    chosen = {}
    for role in ("generator", "init"):
        source_stage, choice = cfg.round_link(round_index, role)
        source = previous if source_stage == previous.stage else warmup
        uri, step = pick_checkpoint(source, choice, f"round {round_index}'s {role}")
        if role == "generator" and source.stage == "warmup" and cfg.model.generator_init:
            uri, choice = given_checkpoint(cfg, "generator_init"), "model.generator_init"
        chosen[role] = uri
        lineage.update({role: uri, f"{role}_from": getattr(st, f"{role}_from"), f"{role}_stage": source.stage,
                        f"{role}_checkpoint": choice, f"{role}_step": step})

    label_cfg = cfg.round_label_config(round_index, chosen["generator"])
    train_cfg = cfg.round_train_config(round_index, chosen["init"])
    run_id = tracker.stage_run(stage)
    tracker.log_config(run_id, {"labels": config_lib.to_dict(label_cfg), "train": config_lib.to_dict(train_cfg),
                                "lineage": lineage})
    start = time.perf_counter()
    manifest = pseudo_label.run(label_cfg)
    seconds = time.perf_counter() - start
    fresh = manifest["prediction_parts_reused"] < manifest["num_parts"]
    tracker.log_pseudo_labels(run_id, manifest, images_per_s=manifest["num_images"] / seconds if fresh else None,
                              generator_round=round_index - 1 if st.generator_from == "previous_round" else 0)
    record = _train_tracked(cfg, stage, run_id, tracker, train_cfg)
    stats = manifest["statistics"]
    record.metrics.update({"pseudo/coverage": stats["coverage_all"], "pseudo/precision": stats["precision_all"]})
    record.lineage = {**lineage, "steps": train_cfg.iterations}
    tracker.finish(run_id)
    return _write_record(cfg, record)


def run_source_free(cfg: ExperimentConfig, tracker: ExperimentTracker) -> StageRecord:
    """STvM from the warm-up's weights on the target images only (idempotent)."""
    record = read_record(cfg, "stvm")
    if record is not None:
        return record
    warmup = warmup_record(cfg)
    if warmup is None:
        raise RuntimeError("stvm starts from the warm-up, which has not finished: run the stages in order with "
                           "jobs/run_experiment.py (finished stages are skipped)")
    train_cfg = cfg.stvm_train_config(warmup.checkpoint)
    run_id = tracker.stage_run("stvm")
    tracker.log_config(run_id, config_lib.to_dict(train_cfg))
    record = _train_tracked(cfg, "stvm", run_id, tracker, train_cfg)
    record.lineage = {"init": warmup.checkpoint, "steps": train_cfg.iterations}
    tracker.finish(run_id)
    return _write_record(cfg, record)


@ray.remote
def _evaluate_shard(arch: str, num_classes: int, checkpoint: str, samples: list[Sample],
                    sizes: tuple, flip: bool, amp: bool = False, space: str = "cityscapes19") -> np.ndarray:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(arch, num_classes)
    load_checkpoint(model, checkpoint, label_space=space)
    model.to(device).eval()
    cm = ConfusionMatrix(num_classes)
    for sample in samples:
        label = load_label(sample.label)
        x = normalize(torch.from_numpy(load_image(sample.image))[None].to(device))
        probs = predict_probs(model, x, sizes=list(sizes) or None, flip=flip, output_size=label.shape[::-1],
                              autocast=amp)
        cm.update(probs.argmax(1)[0], label)
    return cm.matrix


def evaluate_checkpoint(cfg: ExperimentConfig, checkpoint: str, samples: list[Sample] | None = None,
                        sizes=None, flip: bool | None = None) -> ConfusionMatrix:
    """Evaluation of a checkpoint sharded over Ray tasks: by default on the val set with
    the final evaluation's sizes and flip."""
    samples = cfg.data.val.samples() if samples is None else samples
    sizes = cfg.final_eval.sizes if sizes is None else sizes
    flip = cfg.final_eval.flip if flip is None else flip
    c = cfg.compute
    shards = [samples[i::c.eval_workers] for i in range(c.eval_workers)]
    task = _evaluate_shard.options(num_gpus=1 if c.use_gpu else 0, num_cpus=c.cpus_per_worker)
    amp = c.inference_amp and c.use_gpu  # fp16 autocast on the GPU only
    refs = [task.remote(cfg.model.arch, cfg.num_classes, checkpoint, shard, sizes, flip, amp, cfg.label_space)
            for shard in shards if shard]
    return ConfusionMatrix(cfg.num_classes, sum(ray.get(refs)), cfg.label_space)


def source_heldout_metrics(cfg: ExperimentConfig, checkpoint: str) -> dict[str, float]:
    """``source_val/...``: the source model on source frames it never trained on (single
    scale, as every stage's validation)."""
    cm = evaluate_checkpoint(cfg, checkpoint, cfg.data.source_val.samples(), sizes=(), flip=False)
    return {f"source_val/{k}": v for k, v in cm.summary().items() if v is not None and math.isfinite(v)}


# The built-in benchmark's preconditions (a faithful miniature of GTA5 -> Cityscapes, where
# DeepLab-v2 fits both domains and loses accuracy only in transfer: 35.6 / ~65 = 0.55).
P1_SOURCE_HELDOUT, P1_ORACLE, P2_RANGE = 70.0, 65.0, (0.45, 0.65)


def preconditions(records: list[StageRecord], key: str = "mIoU-19") -> str:
    """P1 (learnable) and P2 (a real gap) from a finished chain's records, one line each."""
    by_stage = {r.stage: r.metrics for r in records}
    held_out = by_stage.get("source_only", {}).get(f"source_val/{key}")
    source = by_stage.get("source_only", {}).get(f"val/{key}")
    oracle = by_stage.get("oracle", {}).get(f"val/{key}")
    rounds = [r for r in records if r.stage.startswith("round_") or r.stage == "stvm"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = []
    if held_out is not None and oracle is not None:
        lines.append(f"P1 learnable: source model on held-out source {100 * held_out:.2f} (>= {P1_SOURCE_HELDOUT:.0f}), "
                     f"oracle on target val {100 * oracle:.2f} (>= {P1_ORACLE:.0f}): "
                     f"{verdict(100 * held_out >= P1_SOURCE_HELDOUT and 100 * oracle >= P1_ORACLE)}")
    if source is not None and oracle:
        ratio = source / oracle
        lines.append(f"P2 a real gap: source-only / oracle = {100 * source:.2f} / {100 * oracle:.2f} = {ratio:.2f} "
                     f"(in {P2_RANGE[0]}-{P2_RANGE[1]}): {verdict(P2_RANGE[0] <= ratio <= P2_RANGE[1])}")
        if rounds and f"val/{key}" in rounds[-1].metrics and oracle > source:
            best = max(r.metrics.get(f"val/{key}", float("-inf")) for r in rounds)
            last = rounds[-1].metrics[f"val/{key}"]
            gap = oracle - source
            lines.append(f"gap closed: last round {100 * (last - source) / gap:.0f}%, best round "
                         f"{100 * (best - source) / gap:.0f}% of source-only -> oracle (goal >= 50%)")
    return "\n".join(lines)


def adaptation_records(cfg: ExperimentConfig) -> list[StageRecord]:
    """The finished records of the adaptation's stages (the rounds, or stvm), in order."""
    stages = ["stvm"] if cfg.source_free else [f"round_{r}" for r in range(1, len(cfg.self_training.rounds) + 1)]
    return [r for r in (read_record(cfg, stage) for stage in stages) if r is not None]


def best_on_val(cfg: ExperimentConfig, records: list[StageRecord]) -> tuple[StageRecord, str] | None:
    """The record and URI of the best weights on val over all the adaptation's stages
    (each stage's best, by ``val_metric``), as the released figure is chosen; None
    without periodic validation."""
    key = f"best/val/{cfg.val_metric}"
    kept = [r for r in records if "best" in r.checkpoints and key in r.metrics]
    if not kept:
        return None
    record = max(kept, key=lambda r: r.metrics[key])
    return record, record.checkpoints["best"]


def run_final_eval(cfg: ExperimentConfig, tracker: ExperimentTracker) -> StageRecord:
    """Multi-scale evaluation (final_eval.sizes) of the adaptation's last weights and, with
    periodic validation, of its best on val; ``val/...`` is chain.report's, ``last/val/...``
    and ``best/val/...`` both, ``flip/val/...`` the headline with flip (final_eval.report_flip)."""
    record = read_record(cfg, "final_eval")
    if record is not None:
        return record
    last = read_record(cfg, cfg.adaptation_stage)
    if last is None:
        raise RuntimeError(f"the final evaluation needs {cfg.adaptation_stage} to be finished: run "
                           "jobs/run_experiment.py")
    evaluated = {"last": (last, last.checkpoint)}
    best = best_on_val(cfg, adaptation_records(cfg))
    if best is not None:
        evaluated["best"] = best
    headline = cfg.chain.report if cfg.chain.report in evaluated else "last"
    run_id = tracker.stage_run("final_eval")
    tracker.log_config(run_id, {"checkpoint": evaluated[headline][1], "report": headline,
                                "checkpoints": {k: v[1] for k, v in evaluated.items()},
                                "sizes": [list(x) for x in cfg.final_eval.sizes], "flip": cfg.final_eval.flip,
                                "report_flip": cfg.final_eval.report_flip, "protocol": cfg.protocol})
    metrics, lineage = {}, {"evaluated": evaluated[headline][0].stage, "report": headline, "protocol": cfg.protocol}

    def evaluate(name: str, uri: str, flip: bool) -> dict:
        cm = evaluate_checkpoint(cfg, uri, flip=flip)
        print(f"final evaluation: {name} ({uri}, flip {'on' if flip else 'off'})\n{cm.table()}", flush=True)
        return _val_metrics({f"val/{k}": v for k, v in cm.summary().items()})

    for name, (source, uri) in evaluated.items():
        values = evaluate(name, uri, cfg.final_eval.flip)
        metrics.update({f"{name}/{k}": v for k, v in values.items()})
        lineage[f"{name}_stage"] = source.stage
        if name == headline:
            metrics.update(values)
    if cfg.final_eval.report_flip and not cfg.final_eval.flip:
        metrics.update({f"flip/{k}": v for k, v in evaluate("flip", evaluated[headline][1], True).items()})
    tracker.log_validation(run_id, {k: v for k, v in metrics.items() if k.startswith("val/")})
    tracker.log_metrics(run_id, {k: v for k, v in metrics.items() if not k.startswith("val/")})
    tracker.set_tags(run_id, checkpoint_uri=evaluated[headline][1])
    tracker.finish(run_id)
    return _write_record(cfg, StageRecord("final_eval", evaluated[headline][1], metrics, lineage))


def final_lines(cfg: ExperimentConfig, records: list[StageRecord]) -> str:
    """The final evaluation's figures in words: which checkpoint each is and which one
    compares with a paper's (the released figure is the best on val, without flip)."""
    final = next((r for r in records if r.stage == "final_eval"), None)
    if final is None:
        return ""
    headline = cfg.space.headline
    m, key = final.metrics, f"val/{headline}"
    sizes = f"{len(cfg.final_eval.sizes)} sizes" if cfg.final_eval.sizes else "single scale"
    lines = [f"final evaluation ({cfg.protocol} protocol, {sizes}, flip {'on' if cfg.final_eval.flip else 'off'}): "
             f"{headline} {100 * m[key]:.2f}, the {final.lineage.get('report', 'last')} weights of "
             f"{final.lineage.get('evaluated')}"]
    if f"best/{key}" in m:
        lines.append(f"  best on val ({final.lineage.get('best_stage')}): {100 * m[f'best/{key}']:.2f}  <- the "
                     "released figures (51.88, 51.54) are of this kind: chosen on the target val set")
    if f"last/{key}" in m:
        lines.append(f"  last weights ({cfg.adaptation_stage}): {100 * m[f'last/{key}']:.2f}")
    if f"flip/{key}" in m:
        lines.append(f"  with flip: {100 * m[f'flip/{key}']:.2f}")
    return "\n".join(lines)


STAGES_FIGURE = "figures/stages_on_val.png"
FIGURE_WIDTH = 384  # pixels per column: Cityscapes' 2048 columns would make a 14k-pixel sheet


@ray.remote
def _predict_stages(arch: str, num_classes: int, checkpoints: list[str], samples: list[Sample]) -> list[list[np.ndarray]]:
    """Single-scale predictions (train ids at image size) of each checkpoint on each sample."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = [normalize(torch.from_numpy(load_image(s.image))[None]).to(device) for s in samples]
    predictions = []
    for checkpoint in checkpoints:
        model = build_model(arch, num_classes)
        load_checkpoint(model, checkpoint)
        model.to(device).eval()
        predictions.append([predict_probs(model, x).argmax(1)[0].byte().cpu().numpy() for x in images])
    return predictions


def stages_figure(cfg: ExperimentConfig, records: list[StageRecord], num_images: int = 4) -> Image.Image:
    """What each stage predicts on the same target val images: image | one column per
    stage (its val mIoU-19 in the header) | ground truth, spread over the val set."""
    samples = cfg.data.val.samples()
    samples = samples[:: max(1, len(samples) // num_images)][:num_images]
    task = _predict_stages.options(num_gpus=1 if cfg.compute.use_gpu else 0, num_cpus=cfg.compute.cpus_per_worker)
    predictions = ray.get(task.remote(cfg.model.arch, cfg.num_classes, [r.checkpoint for r in records], samples))
    rows = [label_cells(fit_width(load_image(sample.image), FIGURE_WIDTH), *(stage[i] for stage in predictions),
                        load_label(sample.label), space=cfg.label_space)
            for i, sample in enumerate(samples)]
    key = f"val/{cfg.space.headline}"
    headers = ["target val image"] + [
        f"{r.stage} ({100 * r.metrics[key]:.1f})" if key in r.metrics else r.stage for r in records
    ] + ["ground truth"]
    title = f"{cfg.name}: each stage on the same target val images (single scale; val {cfg.space.headline} in brackets)"
    caption = f"{cfg.data.val.root} ({cfg.data.val.split}): " + ", ".join(s.name for s in samples)
    return contact_sheet([(caption, [[np.asarray(side_by_side(rows, headers))]])], title=title, space=cfg.label_space)


def _log_stages_figure(cfg: ExperimentConfig, tracker: ExperimentTracker, records: list[StageRecord]) -> None:
    """Draws the figure once, when the chain has finished (delete it to draw it again)."""
    path = storage.join(cfg.output, STAGES_FIGURE)
    if storage.exists(path):
        return
    shown = [r for r in records if r.stage != "final_eval"]  # the last round's weights, evaluated again
    save_png(stages_figure(cfg, shown), path)
    tracker.log_files(tracker.parent_run_id, [path], "figures")


def run_experiment(cfg: ExperimentConfig, tracker: ExperimentTracker, until: str | None = None) -> list[StageRecord]:
    """The whole chain in order; finished stages are skipped. Returns the records in order
    (warm-up stages, rounds or stvm, final evaluation, oracle). ``until``: stop after "warmup" or
    after "round_<r>" (the oracle then does not run either)."""
    rounds = len(cfg.self_training.rounds)
    last_round = {"warmup": 0, None: rounds, **{f"round_{r}": r for r in range(1, rounds + 1)}}
    if until not in last_round:
        raise ValueError(f"until must be warmup or round_1..round_{rounds}, got {until!r}")
    cfg.check()
    records = run_warmup(cfg, tracker)
    for r in range(1, last_round[until] + 1):
        records.append(run_round(cfg, r, tracker))
    if cfg.source_free and until is None:
        records.append(run_source_free(cfg, tracker))
    if until is None:
        records.append(run_final_eval(cfg, tracker))
        if cfg.oracle.iterations > 0:
            records.append(run_training_stage(cfg, "oracle", tracker, init=None))
        _log_stages_figure(cfg, tracker, records)
    return records


ABLATION_VARIANTS = {
    # name: overrides of self_training (selector, regularisation weights)
    "IAS": {},
    "IAS, gamma 8 (released)": {"gamma": 8.0},
    "CBST": {"selector": "cbst"},
    "constant 0.9": {"selector": "constant", "constant_threshold": 0.9},
    "IAS, no regularisation": {"confident_weight": 0.0, "ignored_weight": 0.0},
    # Not a method: the same selected pixels with their true classes. Its distance to "IAS"
    # is what the generator's confident mistakes cost; its distance to the oracle is what
    # the unselected pixels would add.
    "IAS pixels, true classes (upper bound)": {"label_values": "ground_truth"},
}


def _slug(name: str) -> str:
    return "_".join(re.findall(r"[a-z0-9]+", name.lower()))


def _from_warmup(cfg: ExperimentConfig, warmup: StageRecord, tag: str, folder: str, rounds: int, seed: int,
                 changes: dict) -> ExperimentConfig:
    """``cfg``'s first ``rounds`` rounds with ``changes`` to self_training, started from the
    finished ``warmup``, in ``<output>/<folder>`` and MLflow experiment ``<name>-<tag>``.
    Round 1 takes the warm-up's weights the chain chooses (e.g. its best to label, its last
    to start from), as files of the variant's model.init and model.generator_init."""
    init, _ = pick_checkpoint(warmup, cfg.chain.round1_init, "round 1's init")
    generator, _ = pick_checkpoint(warmup, cfg.chain.round1_generator, "round 1's generator")
    return dataclasses.replace(
        cfg,
        name=f"{cfg.name}-{tag}",
        output=storage.join(cfg.output, folder),
        tracking_uri=cfg.tracking_uri or default_tracking_uri(cfg.output),  # one store for all variants
        model=dataclasses.replace(cfg.model, init=init, init_format="ours",
                                  generator_init=generator if generator != init else None),
        chain=dataclasses.replace(cfg.chain, adversarial_init="last", round1_init="last", round1_generator="last"),
        source_only=dataclasses.replace(cfg.source_only, iterations=0),
        adversarial=dataclasses.replace(cfg.adversarial, iterations=0),
        oracle=dataclasses.replace(cfg.oracle, iterations=0),
        self_training=dataclasses.replace(cfg.self_training, rounds=cfg.self_training.rounds[:rounds], **changes),
        seed=seed,
    )


def ablation_configs(cfg: ExperimentConfig, warmup: StageRecord) -> dict[str, ExperimentConfig]:
    """Round 1 of ``cfg`` under each selector / loss variant, all from the same warm-up
    model, each with its own output folder (``<output>/<variant>``) and MLflow experiment."""
    return {name: _from_warmup(cfg, warmup, f"ablation-{_slug(name)}", _slug(name), 1, cfg.seed, changes)
            for name, changes in ABLATION_VARIANTS.items()}


METHODS = {
    # name: overrides of self_training; HIAST's settings of reference §4 beyond the config's own
    "IAST": {"consistency": None, "hard_classes": 0},
    "HIAST: EMA teacher, strong views, consistency": {"consistency": ConsistencyConfig(), "hard_classes": 0},
    "HIAST: + hard-class paste": {"consistency": ConsistencyConfig(), "hard_classes": 14},
}
# Source-free, with the config's stvm settings, for as many steps as all the rounds together.
SOURCE_FREE = "STvM (source-free)"


def _source_free_from_warmup(cfg: ExperimentConfig, warmup: StageRecord, tag: str, folder: str,
                             seed: int) -> ExperimentConfig:
    variant = _from_warmup(cfg, warmup, tag, folder, len(cfg.self_training.rounds), seed, {})
    steps = len(cfg.self_training.rounds) * cfg.self_training.iterations
    return dataclasses.replace(variant, self_training=dataclasses.replace(variant.self_training, rounds=[]),
                               stvm=dataclasses.replace(cfg.stvm, iterations=steps))


def method_configs(cfg: ExperimentConfig, warmup: StageRecord, seeds: int) -> dict[tuple[str, int], ExperimentConfig]:
    """Every round of ``cfg`` under IAST's and HIAST's training, and STvM for as many steps
    as the rounds together, from one warm-up model, with ``seeds`` seeds each (cfg.seed,
    cfg.seed + 1, ...: sample order and augmentation), keyed by (method, seed).
    Self-training's spread from seed to seed is a point or more on the benchmark, so one
    run per method cannot tell them apart."""
    configs = {}
    for seed in range(cfg.seed, cfg.seed + seeds):
        for name, changes in METHODS.items():
            configs[name, seed] = _from_warmup(cfg, warmup, f"{_slug(name)}-seed{seed}",
                                               f"methods/{_slug(name)}_seed{seed}", len(cfg.self_training.rounds),
                                               seed, changes)
        configs[SOURCE_FREE, seed] = _source_free_from_warmup(cfg, warmup, f"stvm-seed{seed}",
                                                              f"methods/stvm_seed{seed}", seed)
    return configs
