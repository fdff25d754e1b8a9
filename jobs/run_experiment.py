"""The whole chain: warm-up -> rounds 1..R -> final (multi-scale) evaluation -> oracle.

    python jobs/run_experiment.py --config configs/benchmark.yaml [--until warmup|round_N] [key=value ...]

Finished stages are skipped, so re-running continues a crashed experiment. Prints the
comparison of stages from MLflow at the end, the benchmark's preconditions (P1 with
data.source_val set, P2) when the stages they need have run, where the stages figure is
and the command that opens the MLflow UI on the experiment.
"""

from __future__ import annotations

import sys

from common import experiment_tracker, init_ray, parse_config

from pipeline import storage
from pipeline.experiment import ExperimentConfig
from pipeline.rounds import STAGES_FIGURE, final_lines, preconditions, run_experiment
from pipeline.tracking import comparison_table, default_tracking_uri, scrub_uri


def _until(parser) -> None:
    parser.add_argument("--until", help="stop after this stage: warmup or round_<r> (default: run everything)")


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(ExperimentConfig, __doc__, argv, extra=_until)
    init_ray()
    tracker = experiment_tracker(cfg)
    records = run_experiment(cfg, tracker, until=args.until)
    tracker.log_summary()  # the parent's rounds/... series, also after --until
    if args.until is None:
        tracker.finish(tracker.parent_run_id)
    print()
    print(comparison_table(tracker.tracking_uri, cfg.name, tracker.run_name))
    summary = final_lines(cfg, records)
    if summary:
        print("\n" + summary)
    checks = preconditions(records)
    if checks:
        print("\n" + checks)
    print()
    print(closing_lines(cfg, tracker.tracking_uri))
    return 0


def closing_lines(cfg: ExperimentConfig, tracking_uri: str) -> str:
    """Where the stages figure is and how to open the MLflow UI on the run."""
    lines = []
    figure = storage.join(cfg.output, STAGES_FIGURE)
    if storage.exists(figure):
        lines.append(f"Figure (each stage's predictions on the same val images): {figure}")
    lines.append(f"MLflow store: {scrub_uri(tracking_uri)}")
    local = storage.scheme(cfg.output) == "file" and tracking_uri == default_tracking_uri(cfg.output)
    if local:
        lines.append(f"Browse it (from the repository root): make mlflow-ui OUT={cfg.output}  "
                     "-> http://127.0.0.1:5000 (PORT=... for another port)")
    else:
        lines.append("Browse it in that MLflow server's UI")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
