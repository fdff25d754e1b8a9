"""Round-1 ablation on one warm-up model: IAS vs CBST vs a constant threshold, IAS with
the released hard-class exponent (γ 8) when the config sets another, and IAS without the
region-guided regularisation; and, as a diagnostic upper bound, the pixels IAS selects
with their true classes (needs the target's labels; not a method).

    python jobs/ablation.py --config configs/benchmark.yaml [key=value ...]    (make ablation)

Prints round-1 val mIoU and pseudo-label coverage / precision per variant. Finished
variants are skipped on a re-run.
"""

from __future__ import annotations

import sys

from common import experiment_tracker, init_ray, parse_config

from pipeline.experiment import ExperimentConfig
from pipeline.rounds import ablation_configs, run_round, warm_up


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ExperimentConfig, __doc__, argv)
    init_ray()
    main = experiment_tracker(cfg)
    warmup = warm_up(cfg, main)
    main.finish(main.parent_run_id)  # re-opened to find (or train) the warm-up: closed again
    rows = []
    for name, variant in ablation_configs(cfg, warmup).items():
        tracker = experiment_tracker(variant)
        tracker.log_start(warmup.metrics)  # step 0 of the parent run's rounds/... curves
        record = run_round(variant, 1, tracker)
        tracker.finish(tracker.parent_run_id)
        m = record.metrics
        rows.append((name, _percent(m.get("val/mIoU-19")), _percent(m.get("pseudo/coverage")),
                     _percent(m.get("pseudo/precision"))))
    print(f"\nround 1 from the {warmup.stage} model (val mIoU-19 {_percent(warmup.metrics.get('val/mIoU-19'))}):\n")
    print("| variant | round-1 val mIoU-19 (%) | pseudo-label coverage (%) | pseudo-label precision (%) |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
