"""Experiment tracking in MLflow: one parent run per experiment, one child run per stage.

Everything here runs on the driver side (the process that runs the rounds), never inside
Ray Train workers: workers send their metrics through ``ray.train.report`` and only rank
0's dict is logged, so "only rank 0 logs" holds by construction and no worker needs MLflow
access. Ray Train 2.60 gives the driver only the last checkpointed report
(``Result.metrics``; ``metrics_dataframe`` holds the kept checkpoints' reports only), so
the training curve is logged by `ReportToMlflow`, a Ray Train callback that runs in the
trainer's controller process (driver side, not a worker) and logs every report as it
arrives.

Runs (found again by tags when an experiment is re-run, so a resumed pipeline re-uses
its runs instead of creating duplicates):

    <run name>                  parent run, tag ``stage=experiment``
      source_only, adversarial  warm-up stages (tag ``round=0``)
      round_1, round_2, ...     one per self-training round (tag ``round=<r>``)
      final_eval, oracle        final multi-scale evaluation; supervised upper bound

Child runs carry ``mlflow.parentRunId`` (the UI nests them) and the tags ``stage``,
``round``, ``status`` (running / finished / failed) and ``checkpoint_uri``. The jobs name
the parent ``<experiment>: <method>, <R> rounds`` and tag it ``method`` and ``rounds``.

The parent run holds the experiment's summary, copied from its finished stage runs each
time a round or end stage finishes (`ExperimentTracker.log_summary`), so that MLflow's
chart view draws the rounds as a curve and its compare view overlays two experiments:

    ==================================  ====================================================
    ``rounds/val/mIoU-19``              at step r: round r's val mIoU-19; step 0: the
                                        warm-up model the rounds start from
    ``rounds/val/mIoU-16``, ``-13``     the same for the SYNTHIA protocol's classes
    ``rounds/pseudo/precision``         at step r: round r's pseudo-label precision
    ``rounds/pseudo/coverage``          at step r: round r's pseudo-label coverage
    ``final/val/mIoU-19``, ...          the final (multi-scale) evaluation's ``val/mIoU-19``,
                                        ``-16``, ``-13`` and ``val/pixel_accuracy``
    ``oracle/val/...``                  the oracle's ``val/mIoU-19``, ``-16``, ``-13``
    ==================================  ====================================================

Metric names (stable; values are fractions in [0, 1], undefined values -- None or NaN,
e.g. the IoU of a class absent from both prediction and ground truth -- are not logged):

    ==================================  ====================================================
    name                                meaning
    ==================================  ====================================================
    ``val/mIoU-19``                     mean IoU over the 19 Cityscapes classes
    ``val/mIoU-16``, ``val/mIoU-13``    mean IoU over the SYNTHIA protocol's 16 / 13 classes
                                        (label space nthu13: ``val/mIoU-13`` over its 13;
                                        robotcar9: ``val/mIoU-9``; no other mIoU)
    ``val/IoU/<class>``                 per-class IoU; class names as in
                                        the label space's ``classes``, spaces kept
                                        (``val/IoU/traffic light``: MLflow allows spaces)
    ``val/pixel_accuracy``              share of labelled pixels predicted correctly
    ``pseudo/coverage``                 share of target pixels given a pseudo-label
    ``pseudo/precision``                share of pseudo-labelled pixels that agree with the
                                        ground truth (only where the target has labels)
    ``pseudo/coverage/<class>``         per class, over the pixels predicted as the class
    ``pseudo/precision/<class>``        per class, over the pixels pseudo-labelled as it
    ``pseudo/threshold/<class>``        final per-class confidence threshold of the selector
    ``pseudo/confidence/<class>``       HIAST's EMA of the mean confidence of the class's
                                        kept pixels (low: a hard class)
    ``pseudo/num_images``               images in the label store
    ``pseudo/images_per_s``             pseudo-labelling throughput (when measured)
    ``train/loss``                      total training loss (mean over the logging window)
    ``train/seg``                       segmentation cross-entropy term
    ``train/confident_reg``             region-guided regulariser on confident pixels
    ``train/ignored_reg``               region-guided regulariser on ignored pixels
    ``train/consistency``               HIAST's teacher-student consistency (ignored pixels)
    ``train/adversarial``               generator's adversarial loss (adversarial warm-up)
    ``train/discriminator``             discriminator loss (adversarial warm-up)
    ``train/lr``                        learning rate of the classifier head
    ``train/data_wait_fraction``        share of step time spent waiting for data
    ``train/steps_per_s``               training throughput
    ==================================  ====================================================

Training metrics are logged at the training step; validation at the step given (the
stage's last training step); pseudo-label metrics at step 0.

Params: the flattened configuration (``a.b.c`` keys), the selector (``pseudo.selector.*``)
and the generator lineage (``generator.checkpoint``, ``generator.sha256``,
``generator.round`` -- the round of the model that made the labels, 0 for the warm-up
model -- and ``pseudo.round``). Values longer than
MLflow's limit are truncated. Params whose key looks like a secret (key, secret, token,
password, credential) are logged as ``***`` and user:password@ is removed from every URI.

Artifacts: ``config.yaml`` (the resolved configuration, scrubbed the same way),
``charts/val_iou.png`` (per-class IoU bars in the class colours), ``previews/*.png``
(pseudo-label previews from the label store).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import ray.train
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from pipeline import storage
from pipeline.config import flatten
from pipeline.labels import ALL_METRIC_KEYS, CITYSCAPES19, LABEL_SPACES, label_space

WARMUP_STAGES = ("source_only", "adversarial")
END_STAGES = ("final_eval", "oracle")
SOURCE_FREE_STAGE = "stvm"  # in place of the rounds; step 1 of the parent's rounds/... series
PARENT_STAGE = "experiment"
REDACTED = "***"
RUN_COLOR = "mlflow.runColor"  # the tag MLflow's UI keeps a run's chart colour in
VALIDATION_KEYS = ALL_METRIC_KEYS  # of every label space (pipeline.labels)
ROUND_SERIES = ("val/mIoU-19", "val/mIoU-16", "val/mIoU-13", "val/mIoU-9", "pseudo/precision", "pseudo/coverage")
ORACLE_KEYS = ("val/mIoU-19", "val/mIoU-16", "val/mIoU-13", "val/mIoU-9")
FINAL_KEYS = (*ORACLE_KEYS, "val/pixel_accuracy")  # per class: on the final_eval run

logger = logging.getLogger(__name__)

_SECRET_KEY = re.compile(r"(^|[._-])(key|secret|token|password|passwd|credentials?)s?($|[._-])", re.IGNORECASE)
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")
_ROUND = re.compile(r"round_([1-9][0-9]*)")


# -- names, URIs, secrets -------------------------------------------------------------------


def default_tracking_uri(output_dir: str) -> str:
    """The SQLite store of a local output folder: ``sqlite:///<abs>/mlflow.db``."""
    if storage.scheme(output_dir) != "file":
        raise ValueError(
            f"output folder {output_dir} is not local: MLflow's SQLite store needs a local "
            "file; give a tracking URI instead (http://host:port of an MLflow server)"
        )
    return f"sqlite:///{os.path.join(os.path.abspath(output_dir), 'mlflow.db')}"


def scrub_uri(text: str) -> str:
    """Remove ``user:password@`` from every URI in ``text``."""
    return _USERINFO.sub(r"\1", text)


def scrub_params(params: dict[str, str]) -> dict[str, str]:
    """Secret-looking keys get ``***``; URIs lose their user info."""
    return {k: REDACTED if _SECRET_KEY.search(k) else scrub_uri(str(v)) for k, v in params.items()}


def scrub_config(data: Any) -> Any:
    """``scrub_params`` applied through a nested config (for the YAML artifact)."""
    if isinstance(data, dict):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) else scrub_config(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [scrub_config(v) for v in data]
    return scrub_uri(data) if isinstance(data, str) else data


def check_stage(stage: str) -> str:
    if stage in WARMUP_STAGES or stage in END_STAGES or stage == SOURCE_FREE_STAGE or _ROUND.fullmatch(stage):
        return stage
    raise ValueError(
        f"unknown stage {stage!r}: use one of {', '.join(WARMUP_STAGES)}, round_<r> (r >= 1), {SOURCE_FREE_STAGE}, "
        f"{', '.join(END_STAGES)}"
    )


def stage_order(stage: str) -> tuple[int, int]:
    """Sort key: warm-up stages, rounds by number, then the final evaluation and oracle."""
    if stage in WARMUP_STAGES:
        return 0, WARMUP_STAGES.index(stage)
    if stage in END_STAGES:
        return 2, END_STAGES.index(stage)
    if stage == SOURCE_FREE_STAGE:
        return 1, 1
    return 1, int(check_stage(stage).split("_")[1])


def _round_of(stage: str) -> str | None:
    if stage in WARMUP_STAGES:
        return "0"
    match = _ROUND.fullmatch(stage)
    return match.group(1) if match else None


def _now() -> int:
    return int(time.time() * 1000)


def _defined(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


# -- the tracker ------------------------------------------------------------------------------


class ExperimentTracker:
    """Parent and stage runs of one experiment, through an explicit ``MlflowClient``.

    ``tracking_uri``: ``sqlite:///...`` (see `default_tracking_uri`) or ``http://host:port``.
    ``run_name`` identifies the parent run (default: the experiment name): a re-run with
    the same name re-uses it and its stage runs. ``artifact_location`` applies when the
    experiment is created; for a SQLite store it defaults to ``mlartifacts/`` beside the
    database (MLflow's own default is the current directory). ``tags``: set on the parent
    run (e.g. ``method``, ``rounds``). ``old_run_name``: a parent of that name, and none
    named ``run_name``, is this experiment's run from before a renaming: it is taken over
    and renamed (the jobs once named the parent after the experiment alone). ``color``
    (``#rrggbb``): the parent's colour in MLflow's charts, set when it has none (the UI
    lets users change it); MLflow's own pick can give two runs the same colour.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        artifact_location: str | None = None,
        tags: dict[str, Any] | None = None,
        old_run_name: str | None = None,
        color: str | None = None,
    ):
        if tracking_uri.startswith("sqlite:///"):
            db = tracking_uri[len("sqlite:///") :]
            os.makedirs(os.path.dirname(db) or ".", exist_ok=True)
            artifact_location = artifact_location or os.path.join(os.path.dirname(db), "mlartifacts")
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.experiment = experiment
        self.run_name = run_name or experiment
        self.tags = {k: str(v) for k, v in (tags or {}).items()}
        self.old_run_name = old_run_name
        self.color = color
        found = self.client.get_experiment_by_name(experiment)
        if found is not None and found.lifecycle_stage == "deleted":
            raise ValueError(
                f"MLflow experiment {experiment!r} is deleted in {scrub_uri(tracking_uri)}: restore it "
                "(mlflow experiments restore) or choose another experiment name"
            )
        self.experiment_id = (
            found.experiment_id if found else self.client.create_experiment(experiment, artifact_location)
        )
        self._parent_id: str | None = None
        self._stages: dict[str, str] = {}  # run id -> stage, of the stage runs opened here

    def _find(self, filter_string: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string, max_results=1, order_by=["attributes.start_time ASC"]
        )
        return runs[0].info.run_id if runs else None

    def _resume(self, run_id: str) -> str:
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, "status", "running")
        return run_id

    def _find_parent(self, run_name: str) -> str | None:
        return self._find(f"tags.stage = '{PARENT_STAGE}' and attributes.run_name = '{_quote(run_name)}'")

    @property
    def parent_run_id(self) -> str:
        """The experiment's parent run, created on first use and found again on a re-run
        (or under ``old_run_name``, then renamed)."""
        if self._parent_id is None:
            found = self._find_parent(self.run_name)
            if not found and self.old_run_name and self.old_run_name != self.run_name:
                found = self._find_parent(self.old_run_name)
                if found:
                    self.client.update_run(found, name=self.run_name)
            if found:
                self._parent_id = self._resume(found)
            else:
                tags = {"stage": PARENT_STAGE, "status": "running"}
                run = self.client.create_run(self.experiment_id, tags=tags, run_name=self.run_name)
                self._parent_id = run.info.run_id
            tags = dict(self.tags)
            if self.color and RUN_COLOR not in self.client.get_run(self._parent_id).data.tags:
                tags[RUN_COLOR] = self.color
            if tags:
                self.set_tags(self._parent_id, **tags)
        return self._parent_id

    def supersede_parent(self, reason: str) -> str:
        """Mark the parent run FAILED and keep it, renamed ``<name> (superseded)`` with a
        ``superseded`` tag; the next use of ``parent_run_id`` creates a new parent. For an
        experiment whose start failed before any stage finished, re-run with corrected
        settings (MLflow params cannot change). Returns the old run's id."""
        old = self.parent_run_id
        self.client.set_tag(old, "superseded", reason[:MAX_PARAM_VAL_LENGTH])
        self.client.update_run(old, name=f"{self.run_name} (superseded)")
        self.finish(old, "FAILED")
        self._parent_id = None
        return old

    def stage_run(self, stage: str) -> str:
        """The child run of ``stage`` (``source_only``, ``round_2``, ...), re-used on resume."""
        check_stage(stage)
        parent = self.parent_run_id
        found = self._find(f"tags.mlflow.parentRunId = '{parent}' and tags.stage = '{stage}'")
        if found:
            run_id = self._resume(found)
        else:
            tags = {"mlflow.parentRunId": parent, "stage": stage, "status": "running"}
            if _round_of(stage) is not None:
                tags["round"] = _round_of(stage)
            run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=stage).info.run_id
        self._stages[run_id] = stage
        return run_id

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """Close a run: ``FINISHED``, ``FAILED`` or ``KILLED`` (also the ``status`` tag).
        A finished round or end stage updates the parent's summary (`log_summary`); the
        warm-up stages do not, as step 0 is the last of them, known once a round runs."""
        self.client.set_tag(run_id, "status", status.lower())
        self.client.set_terminated(run_id, status)
        stage = self._stages.get(run_id)
        if status == "FINISHED" and stage is not None and stage not in WARMUP_STAGES:
            self.log_summary()

    # -- params and tags --------------------------------------------------------------------

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Flatten, scrub, truncate and log in batches. MLflow params cannot change: a
        re-run with a different value is an error that names the key."""
        flat = scrub_params(flatten(params))
        flat = {k: v[:MAX_PARAM_VAL_LENGTH] for k, v in flat.items()}
        logged = self.client.get_run(run_id).data.params
        changed = {k: (logged[k], v) for k, v in flat.items() if k in logged and logged[k] != v}
        if changed:
            lines = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            raise ParamsChanged(
                f"run {run_id} was logged with other settings ({lines}); MLflow params cannot "
                "change: use a new run name for a new configuration, or restore the old settings"
            )
        new = [Param(k, v) for k, v in sorted(flat.items()) if k not in logged]
        for chunk in _chunks(new, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk)

    def log_config(self, run_id: str, config: dict) -> None:
        """The resolved configuration: flattened params and a ``config.yaml`` artifact."""
        self.log_params(run_id, config)
        text = yaml.safe_dump(scrub_config(config), sort_keys=False)
        self.client.log_text(run_id, text, "config.yaml")

    def set_tags(self, run_id: str, **tags: Any) -> None:
        """E.g. ``checkpoint_uri=...``; values are scrubbed of user info."""
        items = [RunTag(k, scrub_uri(str(v))) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk)

    # -- metrics ----------------------------------------------------------------------------

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
        """Numeric, finite values of ``metrics`` at ``step`` (other entries are skipped, so
        a Ray Train report with its ``step`` entry can be passed as it is)."""
        timestamp = _now()
        items = [Metric(k, float(v), timestamp, step) for k, v in metrics.items() if k != "step" and _defined(v)]
        for chunk in _chunks(items, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)

    def log_validation(self, run_id: str, summary: dict[str, float], step: int = 0) -> None:
        """``ConfusionMatrix.summary()`` (keys with or without ``val/``) as ``val/...``
        metrics, and the per-class IoU chart ``charts/val_iou.png``."""
        plain = {k.removeprefix("val/"): v for k, v in summary.items()}
        unknown = sorted(set(plain) - VALIDATION_KEYS)
        if unknown:
            raise ValueError(
                f"not validation metrics: {', '.join(unknown)}; expected the keys of "
                "ConfusionMatrix.summary() (IoU/<class>, the label space's mIoUs, pixel_accuracy)"
            )
        self.log_metrics(run_id, {f"val/{k}": v for k, v in plain.items()}, step)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "val_iou.png")
            iou_chart(plain, path)
            self.client.log_artifact(run_id, path, "charts")

    def log_pseudo_labels(
        self, run_id: str, manifest: dict, images_per_s: float | None = None, generator_round: int | None = None
    ) -> None:
        """A label store's manifest (`pipeline.pseudo_label.run`'s result): statistics as
        ``pseudo/...`` metrics, selector and generator lineage as params, previews as artifacts.
        ``generator_round``: the round whose model made the labels (0: the warm-up model);
        by default the previous round."""
        try:
            stats, generator, selector = manifest["statistics"], manifest["generator"], manifest["selector"]
            round_ = int(manifest["round"])
        except KeyError as err:
            raise ValueError(f"label store manifest without {err}: regenerate the store") from None
        metrics = {
            "pseudo/coverage": stats["coverage_all"],
            "pseudo/precision": stats["precision_all"],
            "pseudo/num_images": manifest.get("num_images"),
            "pseudo/images_per_s": images_per_s,
        }
        for key, name in (("coverage", "coverage"), ("precision", "precision"), ("thresholds", "threshold"),
                          ("confidence", "confidence")):
            for cls, value in zip(label_space(manifest.get("label_space", "cityscapes19")).classes, stats.get(key, ())):  # stores before "confidence" lack it
                metrics[f"pseudo/{name}/{cls}"] = value
        self.log_metrics(run_id, metrics)
        self.log_params(
            run_id,
            {
                "generator": {**generator, "round": round_ - 1 if generator_round is None else generator_round},
                "pseudo": {"round": round_, "selector": selector},
            },
        )
        self.log_files(run_id, manifest.get("previews", []), "previews")

    # -- the parent's summary ---------------------------------------------------------------

    def _log_new(self, run_id: str, points: dict[str, dict[int, float]]) -> None:
        """Logs ``{key: {step: value}}`` except the points the run already holds (the
        same value at the same step), so that calling it again adds nothing."""
        timestamp, items = _now(), []
        for key, series in points.items():
            logged = {m.step: m.value for m in self.client.get_metric_history(run_id, key)} if series else {}
            items += [Metric(key, float(v), timestamp, step) for step, v in sorted(series.items())
                      if _defined(v) and not (step in logged and math.isclose(logged[step], v, rel_tol=1e-9))]
        for chunk in _chunks(items, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)

    def log_start(self, metrics: dict[str, float]) -> None:
        """Step 0 of the parent's ``rounds/...`` series when the rounds start from a model
        trained elsewhere (no warm-up stage run in this experiment): its ``val/...`` metrics.
        Then `log_summary`: a re-run whose rounds are all finished (skipped) has its points too."""
        self._log_new(self.parent_run_id, {f"rounds/{k}": {0: metrics[k]} for k in ROUND_SERIES if k in metrics})
        self.log_summary()

    def log_summary(self) -> None:
        """Copies the finished stage runs' figures to the parent run: ``rounds/<metric>``
        at step r (round r; step 0: the last warm-up stage), ``final/val/...`` (the final
        evaluation's mIoU and pixel accuracy) and ``oracle/val/...``. Calling it again adds
        nothing new."""
        parent = self.parent_run_id
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'FINISHED'"
        )
        by_stage = {r.data.tags.get("stage"): r.data.metrics for r in runs}
        steps = {int(_round_of(stage)): m for stage, m in by_stage.items() if _ROUND.fullmatch(str(stage))}
        if SOURCE_FREE_STAGE in by_stage:
            steps[1] = by_stage[SOURCE_FREE_STAGE]
        warmup = [stage for stage in WARMUP_STAGES if stage in by_stage]
        if warmup:
            steps[0] = by_stage[warmup[-1]]  # the model the rounds start from
        points = {f"rounds/{k}": {step: m[k] for step, m in steps.items() if k in m} for k in ROUND_SERIES}
        final = by_stage.get("final_eval", {})
        points.update({f"final/{k}": {0: final[k]} for k in FINAL_KEYS if k in final})
        oracle = by_stage.get("oracle", {})
        points.update({f"oracle/{k}": {0: oracle[k]} for k in ORACLE_KEYS if k in oracle})
        self._log_new(parent, points)

    # -- artifacts --------------------------------------------------------------------------

    def log_files(self, run_id: str, uris: Iterable[str], artifact_path: str) -> None:
        """Files given as local paths or URIs (s3://...), copied locally then logged."""
        uris = list(uris)
        if not uris:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for uri in uris:
                if not storage.exists(uri):
                    raise FileNotFoundError(f"artifact {uri} not found")
                with open(os.path.join(tmp, os.path.basename(uri.rstrip("/"))), "wb") as f:
                    f.write(storage.read_bytes(uri))
            self.client.log_artifacts(run_id, tmp, artifact_path)

    def report_callback(self, run_id: str) -> ReportToMlflow:
        """A Ray Train callback that logs every report of a stage into ``run_id``."""
        return ReportToMlflow(self.tracking_uri, run_id)


class ParamsChanged(ValueError):
    """A run's params were logged with other values (MLflow params cannot change)."""


@contextmanager
def _fail_fast() -> Iterator[None]:
    """MLflow's HTTP client retries a failed request for minutes by default; a report
    that cannot be delivered now is kept and sent with the next one instead, so one
    try, and a short timeout for a server that hangs. (Process-wide environment: the
    callback runs alone in Ray Train's controller.)"""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class ReportToMlflow(ray.train.UserCallback):
    """``RunConfig(callbacks=[tracker.report_callback(run_id)])``: logs rank 0's report
    (``train/...``, ``val/...``) at its ``step`` entry as each report arrives. Runs in
    Ray Train's controller, so the tracking URI must be reachable from the head node.

    An unreachable tracking server does not stop training: a report that cannot be
    delivered is kept, with its own step and time, and sent with the next report that
    gets through; the first failure is warned about once, with the count held, and the
    recovery too. The held metrics are also written to ``pending_file`` (a local file:
    Ray Train places its controller on the driver's node), so that what is still held
    when the stage ends is delivered by the driver's `deliver_pending`, or reported
    there with its count. The file is named after the run, so the same command run again
    (the stage fails if MLflow is still down when it ends) finds and sends what the
    earlier invocation held, before its own reports."""

    def __init__(self, tracking_uri: str, run_id: str, pending_file: str | None = None):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.pending_file = pending_file or os.path.join(tempfile.gettempdir(), f"mlflow-pending-{run_id}.jsonl")
        self._pending: list[Metric] = []
        self._failing = False
        self._took_over = False  # the held metrics of an earlier invocation, read at the first report

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not self._took_over:
            self._pending = self._read_pending() + self._pending
            self._took_over = True
        report = metrics[0]
        timestamp, step = _now(), int(report.get("step", 0))
        items = [Metric(k, float(v), timestamp, step) for k, v in report.items() if k != "step" and _defined(v)]
        self._pending += items[:MAX_METRICS_PER_BATCH]
        self._send()

    def deliver_pending(self) -> int:
        """On the driver, after the stage: send what the controller still held (read from
        ``pending_file``, which the controller keeps current). Returns the number of
        metrics still undelivered (0: all in MLflow), which are then warned about and
        kept in the file."""
        self._pending = self._read_pending()
        if self._pending and not self._send():
            logger.warning(
                "%d training metrics of MLflow run %s were not delivered to %s (unreachable); they are kept "
                "in %s (one JSON [key, value, timestamp, step] a line)",
                len(self._pending), self.run_id, scrub_uri(self.tracking_uri), self.pending_file)
        return len(self._pending)

    def _send(self) -> bool:
        """Deliver the held metrics in order; False (and kept) if the server fails."""
        held = len(self._pending)
        try:
            with _fail_fast():
                client = MlflowClient(self.tracking_uri)
                while self._pending:
                    client.log_batch(self.run_id, metrics=self._pending[:MAX_METRICS_PER_BATCH])
                    del self._pending[:MAX_METRICS_PER_BATCH]
        except Exception as err:  # requests' or MLflow's error: any failure of the server
            if not self._failing:
                logger.warning(
                    "MLflow at %s is unreachable (%s): training goes on; its metrics are kept and sent "
                    "when the server answers again (%d held now)",
                    scrub_uri(self.tracking_uri), type(err).__name__, len(self._pending))
            self._failing = True
            self._write_pending()
            return False
        if self._failing:
            logger.warning("MLflow at %s answers again: %d held metrics delivered", scrub_uri(self.tracking_uri), held)
        self._failing = False
        self._write_pending()
        return True

    def _read_pending(self) -> list[Metric]:
        if not os.path.exists(self.pending_file):
            return []
        with open(self.pending_file) as f:
            return [Metric(*json.loads(line)) for line in f]

    def _write_pending(self) -> None:
        if not self._pending:
            if os.path.exists(self.pending_file):
                os.remove(self.pending_file)
            return
        temporary = f"{self.pending_file}.tmp"
        with open(temporary, "w") as f:
            f.writelines(json.dumps([m.key, m.value, m.timestamp, m.step]) + "\n" for m in self._pending)
        os.replace(temporary, self.pending_file)  # the driver never reads half a file


def iou_chart(summary: dict[str, float], path: str) -> None:
    """Horizontal bars of the per-class IoU (%) in the class colours, the headline mIoU as a line."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state: safe in any thread

    # The label space of the summary: its headline mIoU present, no class of another space
    # (undefined IoUs may be left out).
    classes = {k.removeprefix("IoU/") for k in summary if k.startswith("IoU/")}
    space = next((s for s in LABEL_SPACES.values() if s.headline in summary and classes <= set(s.classes)),
                 CITYSCAPES19)
    names, headline = space.classes, space.headline
    values = [summary.get(f"IoU/{name}", math.nan) for name in names]
    fig = Figure(figsize=(6, 5.5), dpi=100)
    ax = fig.subplots()
    y = range(len(names))
    colors = [space.palette[i] / 255 for i in y]
    ax.barh(y, [0 if math.isnan(v) else 100 * v for v in values], color=colors, edgecolor="black", linewidth=0.5)
    for i, v in enumerate(values):
        ax.text(1 if math.isnan(v) else 100 * v + 1, i, "n/a" if math.isnan(v) else f"{100 * v:.1f}",
                va="center", fontsize=7)
    miou = summary.get(headline, math.nan)
    if not math.isnan(miou):
        ax.axvline(100 * miou, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("IoU (%)")
    ax.set_title(f"validation IoU per class, {headline} {100 * miou:.2f}%" if not math.isnan(miou) else "validation IoU")
    fig.tight_layout()
    fig.savefig(path)


# -- comparison ----------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def comparison_table(tracking_uri: str, experiment: str, run_name: str | None = None) -> str:
    """Markdown table of an experiment's stage runs, read from MLflow, in stage order:
    stage | val mIoU-19 | pseudo-label coverage | precision | checkpoint (values in %).
    ``run_name``: the parent run (default: the most recently started one)."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise ValueError(f"no MLflow experiment {experiment!r} in {scrub_uri(tracking_uri)} (experiments: {names})")
    parent_filter = f"tags.stage = '{PARENT_STAGE}'"
    if run_name:
        parent_filter += f" and attributes.run_name = '{_quote(run_name)}'"
    parents = client.search_runs(
        [found.experiment_id], parent_filter, max_results=1, order_by=["attributes.start_time DESC"]
    )
    if not parents:
        raise ValueError(f"experiment {experiment!r} has no pipeline run" + (f" named {run_name!r}" if run_name else ""))
    parent = parents[0]
    children = client.search_runs([found.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    children = sorted(children, key=lambda r: stage_order(check_stage(r.data.tags["stage"])))
    header = ["stage", "val mIoU-19 (%)", "pseudo-label coverage (%)", "precision (%)", "checkpoint"]
    rows = []
    for run in children:
        m = run.data.metrics
        rows.append([
            run.data.tags["stage"],
            _percent(m.get("val/mIoU-19")),
            _percent(m.get("pseudo/coverage")),
            _percent(m.get("pseudo/precision")),
            run.data.tags.get("checkpoint_uri", "-"),
        ])
    right = [False, True, True, True, False]
    if any("best/val/mIoU-19" in run.data.metrics for run in children):  # periodic validation: its best too
        header.insert(2, "best on val (%)")
        right.insert(2, True)
        for row, run in zip(rows, children):
            row.insert(2, _percent(run.data.metrics.get("best/val/mIoU-19")))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right)) + "|"
    title = f"{experiment} / {parent.info.run_name} ({parent.info.run_id})"
    return "\n".join([title, "", line(header), rule, *map(line, rows)])
