"""One IAST self-training round: pseudo-labels -> self-training -> validation.

    python jobs/iast_round.py --config configs/benchmark.yaml --round 2 [key=value ...]
    ray job submit --working-dir . -- python jobs/iast_round.py --config configs/gta5_cityscapes.yaml \
        --round 1 output=/shared/outputs/gta5_cityscapes

Round r labels the target set with round r-1's final checkpoint (round 1: the warm-up)
and starts from it (self_training.generator_from / init_from say otherwise). Idempotent:
a finished round does nothing; a crashed one resumes (finished label parts are kept,
training continues from its last checkpoint). Without --round, the first unfinished
round runs.
"""

from __future__ import annotations

import sys

from common import experiment_tracker, init_ray, parse_config

from pipeline.experiment import ExperimentConfig
from pipeline.rounds import read_record, run_round


def _round(parser) -> None:
    parser.add_argument("--round", type=int, help="round to run (default: the first unfinished one)")


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(ExperimentConfig, __doc__, argv, extra=_round)
    rounds = len(cfg.self_training.rounds)
    round_index = args.round or next(
        (r for r in range(1, rounds + 1) if read_record(cfg, f"round_{r}") is None), None
    )
    if round_index is None:
        print(f"all {rounds} rounds of {cfg.name} are finished")
        return 0
    init_ray()
    record = run_round(cfg, round_index, experiment_tracker(cfg))
    miou = record.metrics.get("val/mIoU-19")
    print(f"round {round_index}: checkpoint {record.checkpoint}"
          + (f", val mIoU-19 {100 * miou:.2f}" if miou is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
