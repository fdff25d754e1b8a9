"""Validate a dataset folder and write its train-id labels, image lists and class statistics.

    python jobs/prepare_data.py --dataset gta5 --root data/gta5
    python jobs/prepare_data.py --dataset cityscapes --root s3://bucket/cityscapes --out s3://bucket/prepared
    python jobs/prepare_data.py --dataset cityscapes --root data/cityscapes --label-space nthu13
    python jobs/prepare_data.py --dataset cityscapes --root data/cityscapes --semi 1/8
    python jobs/prepare_data.py --dataset nthu --root data/NTHU --city Rome

Exits with status 1 and a report naming every bad file if the folder does not match the
dataset's official layout (see pipeline/data/prepare.py). Re-running overwrites.
"""

from __future__ import annotations

import argparse
import os
import sys

from common import positive_int

from pipeline.data.datasets import DATASETS, NTHU_CITIES
from pipeline.data.prepare import prepare
from pipeline.labels import LABEL_SPACES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", required=True, help="dataset folder or s3:// URI, official layout")
    parser.add_argument("--out", help="where to write trainids/, lists/, stats/ (default: --root)")
    parser.add_argument("--label-space", choices=LABEL_SPACES,
                        help="train ids to write (default: the dataset's own; another goes to "
                             "<root>/prepared_<space> unless --out is given)")
    parser.add_argument("--semi", metavar="F",
                        help="cityscapes: also split train into train_labeled_<F> (a fraction, 1/8, or a count, "
                             "372, in a fixed order written to lists/cityscapes_train_order.txt) and "
                             "train_unlabeled_<F> (the rest), F's '/' written '-'")
    parser.add_argument("--city", choices=NTHU_CITIES, help="nthu: the city to prepare")
    parser.add_argument(
        "--workers", type=positive_int, default=os.cpu_count() or 1,
        help="processes decoding frames (default: CPU count)",
    )
    args = parser.parse_args(argv)
    try:
        result = prepare(args.dataset, args.root, args.out, args.workers, args.label_space, args.semi, args.city)
    except ValueError as e:  # a DatasetError, or a label space the dataset does not map into
        print(e, file=sys.stderr)
        return 1
    for split, count in result.frames.items():
        note = " (no labels)" if split in result.unlabeled else ""
        print(f"{result.dataset} {split}: {count} frames{note}")
    if result.excluded:
        print(f"{len(result.excluded)} known-bad frame(s) excluded: {', '.join(result.excluded)}")
    print(f"wrote {result.out}/lists, {result.out}/stats, {result.out}/trainids ({result.label_space} train ids)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
