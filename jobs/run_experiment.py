"""The whole chain: warm-up -> rounds 1..R -> final (multi-scale) evaluation -> oracle.

    python jobs/run_experiment.py --config configs/benchmark.yaml [--until warmup|round_N] [key=value ...]

Finished stages are skipped, so re-running continues a crashed experiment. Prints the
comparison of stages from MLflow at the end, and the benchmark's preconditions (P1 with
data.source_val set, P2) when the stages they need have run.
"""

from __future__ import annotations

import sys

from common import experiment_tracker, init_ray, parse_config

from pipeline.experiment import ExperimentConfig
from pipeline.rounds import preconditions, run_experiment
from pipeline.tracking import comparison_table, scrub_uri


def _until(parser) -> None:
    parser.add_argument("--until", help="stop after this stage: warmup or round_<r> (default: run everything)")


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(ExperimentConfig, __doc__, argv, extra=_until)
    init_ray()
    tracker = experiment_tracker(cfg)
    records = run_experiment(cfg, tracker, until=args.until)
    if args.until is None:
        tracker.finish(tracker.parent_run_id)
    print()
    print(comparison_table(tracker.tracking_uri, cfg.name))
    checks = preconditions(records)
    if checks:
        print("\n" + checks)
    print(f"\nMLflow: {scrub_uri(tracker.tracking_uri)} (browse it with `make mlflow-ui OUT={cfg.output}`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
