"""Run one training stage on Ray Train (source_only, adversarial, self_training, oracle).

    python jobs/train.py --config configs/benchmark/source_only.yaml [key=value ...]

Settings are a YAML file of pipeline.train.TrainConfig plus key=value overrides. A
re-run with the same name and storage resumes from the last checkpoint. Prints the
validation mIoU (per class) at the end when a val set is configured.
"""

from __future__ import annotations

import sys

from common import init_ray, parse_config

from pipeline.train import TrainConfig, fit


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TrainConfig, __doc__, argv)
    init_ray()
    result = fit(cfg)
    print(f"final checkpoint: {result.checkpoint}")
    if "val/mIoU-19" in result.metrics:
        print(f"val mIoU-19: {100 * result.metrics['val/mIoU-19']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
