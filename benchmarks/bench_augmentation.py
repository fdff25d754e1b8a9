"""The training augmentation on full-size frames: the three steps on the whole frame (the
released order: flip, brightness/contrast, crop) against FlipColourCrop, which draws the
same numbers and gives the same crops bit for bit but flips and recolours the crop only.

    python benchmarks/bench_augmentation.py            # GTA5 (1914x1052) and Cityscapes (2048x1024)

Prints ms per sample (best of --repeat) and the ratio; the crop heights are the released
GTA5 and Cityscapes ones, output 1024x512 (configs/gta5_cityscapes.yaml).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.transforms import (  # noqa: E402
    CITYSCAPES_CROP_HEIGHTS, GTA5_CROP_HEIGHTS, Compose, FlipColourCrop, RandomBrightnessContrast,
    RandomHorizontalFlip, RandomSizedCrop,
)


def per_sample_ms(transform, image, label, repeat: int, samples: int = 8) -> float:
    best = float("inf")
    for r in range(repeat):
        start = time.perf_counter()
        for s in range(samples):
            transform(image, label, np.random.default_rng([r, s]))
        best = min(best, (time.perf_counter() - start) / samples)
    return 1000 * best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for name, (w, h), heights in (("GTA5", (1914, 1052), GTA5_CROP_HEIGHTS),
                                  ("Cityscapes", (2048, 1024), CITYSCAPES_CROP_HEIGHTS)):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = rng.integers(0, 19, (h, w), dtype=np.uint8)
        image.flags.writeable = label.flags.writeable = False  # as the decoded-frame cache holds them
        flip, colour, crop = RandomHorizontalFlip(0.5), RandomBrightnessContrast(p=0.3), RandomSizedCrop(heights, (512, 1024))
        whole = per_sample_ms(Compose([flip, colour, crop]), image, label, args.repeat)
        first = per_sample_ms(Compose([FlipColourCrop(flip, crop, colour)]), image, label, args.repeat)
        print(f"{name:10s} {w}x{h}: whole frame {whole:6.1f} ms, crop first {first:6.1f} ms a sample "
              f"({whole / first:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
