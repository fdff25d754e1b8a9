"""Generate the built-in domain-shift benchmark (no download) and its preview sheet.

    python jobs/make_benchmark.py --out data/benchmark

writes <out>/source (GTA5 layout, labelled), <out>/source_val (held-out source frames, same
layout), <out>/target (Cityscapes layout: unlabelled train set, labelled val set; train
labels too, for oracle and pseudo-label probes) and <out>/preview.png. The same --seed gives
byte-identical files. A target drawn with another look (the knobs of
pipeline.data.benchmark.with_look; values are JSON):

    python jobs/make_benchmark.py --out data/benchmark-haze --target-look haze=0.5 'tint=[1.1,1.0,0.85]'
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import positive_int

from pipeline import storage
from pipeline.data.benchmark import LOOK_KEYS, generate, write_preview
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
    parser.add_argument("--num-source-val", type=positive_int, default=100,
                        help="held-out labelled source frames (the source model's own-domain accuracy)")
    parser.add_argument("--target-look", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"the target's look, changed: {', '.join(LOOK_KEYS)}")
    parser.add_argument("--workers", type=positive_int, help="processes (default: CPU count, at most 8)")
    args = parser.parse_args(argv)

    look = {}
    for item in args.target_look:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--target-look takes KEY=VALUE, got {item!r}")
        try:
            look[key] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--target-look {key}: {value!r} is not a JSON value (e.g. 0.5, [1.1,1.0,0.9], null)")
    start = time.perf_counter()
    try:
        counts = generate(args.out, args.seed, args.num_source, args.num_target_train,
                          args.num_target_val, args.workers, args.num_source_val, look)
    except ValueError as err:
        parser.error(str(err))
    storage.write_bytes(storage.join(args.out, "target_look.json"), json.dumps(look, indent=2).encode())
    seconds = time.perf_counter() - start
    print(f"source:       {args.num_source} frames  -> {args.out}/source/{{images,labels}}")
    print(f"source val:   {args.num_source_val} frames  -> {args.out}/source_val/{{images,labels}} (held out)")
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
