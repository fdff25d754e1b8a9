"""IAST against HIAST and STvM on one warm-up model: every round of the config under
IAST's training, HIAST's teacher-student training (EMA teacher, strong views, consistency
on the unlabelled pixels) and HIAST's training with hard-class pasting, and source-free
STvM (the config's stvm settings) for as many steps as the rounds together, each with
several seeds, since one self-training run differs from the next by a point or more.

    python jobs/compare_methods.py --config configs/benchmark.yaml [--seeds 3] [key=value ...]
    (make compare-methods)

Prints val mIoU-19 per method and round as mean ± standard deviation over the seeds, the
gain of the last round over the warm-up, and each round's pseudo-label precision and
coverage (means over the seeds); STvM's one stage is shown under the last round, with its
teacher's label precision, plain and weighted by reliability. Finished runs are skipped
on a re-run.
"""

from __future__ import annotations

import sys

import numpy as np
from common import experiment_tracker, init_ray, parse_config, positive_int

from pipeline.experiment import ExperimentConfig
from pipeline.rounds import METHODS, SOURCE_FREE, method_configs, run_round, run_source_free, warm_up


def _options(parser) -> None:
    parser.add_argument("--seeds", type=positive_int, default=3, help="runs per method (default 3)")


def _mean_sd(values: list[float]) -> str:
    values = 100 * np.asarray(values)
    if np.isnan(values).any():
        return "-"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def _mean(values: list[float | None]) -> str:
    return "-" if None in values else f"{100 * np.mean(values):.1f}"


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(ExperimentConfig, __doc__, argv, extra=_options)
    init_ray()
    warmup = warm_up(cfg, experiment_tracker(cfg))
    start = warmup.metrics.get("val/mIoU-19")
    rounds = len(cfg.self_training.rounds)
    names = [*METHODS, SOURCE_FREE]
    metrics: dict[str, list[list[dict]]] = {name: [] for name in names}  # method -> seed -> round
    for (name, _seed), variant in method_configs(cfg, warmup, args.seeds).items():
        tracker = experiment_tracker(variant)
        tracker.log_start(warmup.metrics)  # step 0 of the parent run's rounds/... curves
        if variant.source_free:  # one stage, as long as the rounds together: shown as the last round
            metrics[name].append([{}] * (rounds - 1) + [run_source_free(variant, tracker).metrics])
        else:
            metrics[name].append([run_round(variant, r, tracker).metrics for r in range(1, rounds + 1)])
        tracker.finish(tracker.parent_run_id)
    miou = {name: [[m.get("val/mIoU-19", np.nan) for m in runs] for runs in seeds] for name, seeds in metrics.items()}
    print(f"\nval mIoU-19 (%), mean ± sd over {args.seeds} seed(s), from the {warmup.stage} model"
          f" ({'-' if start is None else f'{100 * start:.2f}'}):\n")
    print("| method | " + " | ".join(f"round {r}" for r in range(1, rounds + 1)) + " | last round − warm-up |")
    print("|---|" + "---:|" * (rounds + 1))
    for name, runs in miou.items():
        per_round = np.asarray(runs)
        gain = "-" if start is None else _mean_sd(list(per_round[:, -1] - start))
        print(f"| {name} | " + " | ".join(_mean_sd(list(per_round[:, r])) for r in range(rounds)) + f" | {gain} |")
    print("\npseudo-label precision / coverage (%), means over the seeds (precision needs the target's labels):\n")
    print("| method | " + " | ".join(f"round {r}" for r in range(1, rounds + 1)) + " |")
    print("|---|" + "---:|" * rounds)
    for name, seeds in metrics.items():
        cells = [f"{_mean([runs[r].get('pseudo/precision') for runs in seeds])} / "
                 f"{_mean([runs[r].get('pseudo/coverage') for runs in seeds])}" for r in range(rounds)]
        if name != SOURCE_FREE:
            print(f"| {name} | " + " | ".join(cells) + " |")
    stvm = metrics[SOURCE_FREE]
    print(f"\nSTvM's teacher labels (%), means over the seeds: precision {_mean([s[-1].get('stvm/teacher_precision') for s in stvm])}, "
          f"weighted by reliability {_mean([s[-1].get('stvm/teacher_precision_weighted') for s in stvm])}; "
          f"mean reliability {_mean([s[-1].get('stvm/reliability') for s in stvm])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
