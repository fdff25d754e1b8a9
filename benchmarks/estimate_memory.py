"""Estimated GPU memory of every training stage of the shipped GPU configs, per GPU, at
1, 2 and 4 training workers (pipeline.memory: the model's step on the meta device; no
GPU needed, ~10 s). What ExperimentConfig.problems() checks against compute.gpu_memory_gb.

    .venv/bin/python benchmarks/estimate_memory.py [configs/gta5_cityscapes.yaml ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import config, memory  # noqa: E402
from pipeline.experiment import ExperimentConfig  # noqa: E402

CONFIGS = ["configs/gta5_cityscapes.yaml", "configs/synthia_cityscapes.yaml", "configs/gta5_cityscapes_stvm.yaml"]


def main(paths: list[str]) -> None:
    print("| config | stage | workers | images/GPU | estimated GiB/GPU | fits 15.78 (16 GB) | fits 31.75 (32 GB) |")
    print("|---|---|---:|---:|---:|---|---|")
    for path in paths or CONFIGS:
        for workers in (1, 2, 4):
            cfg = config.load(ExperimentConfig, str(ROOT / path), [f"compute.num_workers={workers}"])
            for stage, build in cfg._training_stages():
                try:
                    est = memory.train_step_gib(build())
                except ValueError:  # a batch these workers do not divide
                    continue
                total = est["total"]
                print(f"| {Path(path).stem} | {stage} | {workers} | {est['per_gpu_batch']} | {total:.1f} | "
                      f"{'yes' if total <= 15.78 else 'no'} | {'yes' if total <= 31.75 else 'no'} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
