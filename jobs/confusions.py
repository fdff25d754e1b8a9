"""Where each class's target pixels go, for finished stages of an experiment: per-class
IoU and the classes its pixels are predicted as, on the target val set (single scale,
like each stage's own validation). Shows which mistakes self-training fixes and which it
learns.

    python jobs/confusions.py --config configs/benchmark.yaml --stages source_only round_3 [key=value ...]
"""

from __future__ import annotations

import sys

from common import parse_config, positive_int

from pipeline.data.datasets import SegmentationDataset
from pipeline.evaluation import evaluate
from pipeline.experiment import ExperimentConfig
from pipeline.models import build_model, load_checkpoint
from pipeline.rounds import read_record


def _options(parser) -> None:
    parser.add_argument("--stages", nargs="+", required=True,
                        help="finished stages: source_only, adversarial, round_1 ... round_N, oracle")
    parser.add_argument("--top", type=positive_int, default=3, help="classes listed per class (default 3)")


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(ExperimentConfig, __doc__, argv, extra=_options)
    records = {stage: read_record(cfg, stage) for stage in args.stages}
    missing = [stage for stage, record in records.items() if record is None]
    if missing:
        print(f"error: no finished stage {', '.join(missing)} under {cfg.output}/stages: run the experiment "
              "first (jobs/run_experiment.py) or name one of its finished stages", file=sys.stderr)
        return 2
    dataset = SegmentationDataset(cfg.data.val.samples())
    sizes = [tuple(cfg.eval_size)] if cfg.eval_size else None
    for stage, record in records.items():
        model = build_model(cfg.model.arch, cfg.num_classes)
        load_checkpoint(model, record.checkpoint)
        cm = evaluate(model, dataset, sizes=sizes, num_classes=cfg.num_classes)
        print(f"\n{stage} ({record.checkpoint}): val mIoU-19 {100 * cm.mean_iou():.2f}\n")
        print(cm.confusion_table(args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
