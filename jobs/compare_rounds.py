"""Print an experiment's stages side by side, read from MLflow:
stage | val mIoU-19 | pseudo-label coverage | precision | checkpoint.

    python jobs/compare_rounds.py --tracking-uri sqlite:///$PWD/outputs/mlflow.db --experiment gta5-to-cityscapes
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.tracking import comparison_table  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", required=True, help="sqlite:///<abs path>/mlflow.db or http://host:port")
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--run-name", help="parent run name (default: the most recent run of the experiment)")
    args = parser.parse_args(argv)
    try:
        print(comparison_table(args.tracking_uri, args.experiment, args.run_name))
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
