"""Share of self-training step time spent waiting for data, with 1 and 2 training workers.

    .venv/bin/python benchmarks/bench_data_wait.py --data data/benchmark   (part of `make bench`)

Runs a short IAST self-training stage (Ray Train, DDP over gloo) on a label store of the
built-in benchmark and prints `train/data_wait_fraction` (time blocked on the DataLoader
over the whole step time, measured in every step of the last logging window) and the step rate.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import ray
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.data.datasets import DataConfig  # noqa: E402
from pipeline.models import build_model, save_checkpoint  # noqa: E402
from pipeline.pseudo_label import PseudoLabelConfig, SelectorConfig, run  # noqa: E402
from pipeline.train import TrainConfig, fit  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/benchmark")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--loader-workers", type=int, default=1, help="DataLoader processes per training worker")
    args = parser.parse_args()

    target = DataConfig("cityscapes", os.path.join(args.data, "target"), "train")
    work = tempfile.mkdtemp(prefix="bench-wait-")
    torch.manual_seed(0)
    checkpoint = os.path.join(work, "small.pt")
    save_checkpoint(checkpoint, build_model("deeplabv2_small", 19))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    store = os.path.join(work, "labels")
    run(PseudoLabelConfig(target=target, store=store, checkpoint=checkpoint, arch="deeplabv2_small",
                          size=(256, 128), selector=SelectorConfig("constant", threshold=0.0)))
    print(f"self-training, deeplabv2_small, batch 8 of 96x192 crops, {args.iterations} steps, "
          f"{args.loader_workers} loader process(es) per worker; load average {os.getloadavg()[0]:.1f}")
    for workers in (1, 2):
        cfg = TrainConfig(
            stage="self_training", name=f"wait-{workers}", storage=os.path.join(work, "runs"),
            iterations=args.iterations, lr=1e-4, arch="deeplabv2_small", init=checkpoint, label_store=store,
            batch_size=8, crop_size=(192, 96), target_crop_heights=(64, 128), checkpoint_every=10**6,
            log_every=args.iterations // 2, num_workers=workers, cpus_per_worker=2 // workers,
            loader_workers=args.loader_workers,
        )
        metrics = fit(cfg).metrics
        print(f"  {workers} worker(s): data wait {100 * metrics['train/data_wait_fraction']:5.1f}% of step time, "
              f"{metrics['train/steps_per_s']:.2f} steps/s (last {args.iterations // 2} steps)")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
