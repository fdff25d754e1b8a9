"""Generate the built-in domain-shift benchmark (no download) and its preview sheet.

    python jobs/make_benchmark.py --out data/benchmark

writes <out>/source (GTA5 layout, labelled), <out>/target (Cityscapes layout: unlabelled
train set, labelled val set; train labels too, for oracle and pseudo-label probes) and
<out>/preview.png. The same --seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import sys
import time

from common import positive_int

from pipeline.data.benchmark import generate, write_preview
from pipeline.labels import CLASS_NAMES, NUM_CLASSES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder or s3:// URI")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-source", type=positive_int, default=400)
    parser.add_argument("--num-target-train", type=positive_int, default=300)
    parser.add_argument("--num-target-val", type=positive_int, default=100)
    parser.add_argument("--workers", type=positive_int, help="processes (default: CPU count, at most 8)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    counts = generate(args.out, args.seed, args.num_source, args.num_target_train,
                      args.num_target_val, args.workers)
    seconds = time.perf_counter() - start
    print(f"source:       {args.num_source} frames  -> {args.out}/source/{{images,labels}}")
    print(f"target train: {args.num_target_train} frames  -> {args.out}/target/{{leftImg8bit,gtFine}}/train")
    print(f"target val:   {args.num_target_val} frames  -> {args.out}/target/{{leftImg8bit,gtFine}}/val")
    print(f"generated in {seconds:.1f} s")
    print("pixel share per class (%):  source  target-train  target-val")
    shares = {name: 100 * c[:NUM_CLASSES] / max(c.sum(), 1) for name, c in counts.items()}
    for k, name in enumerate(CLASS_NAMES):
        print(f"  {name:14s} {shares['source'][k]:6.2f} {shares['target_train'][k]:13.2f} "
              f"{shares['target_val'][k]:11.2f}")
    rows = min(4, args.num_source, args.num_target_val)
    print(f"preview: {write_preview(args.out, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
