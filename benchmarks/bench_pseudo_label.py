"""Pseudo-labelling throughput and label-store size, side by side in one run.

    .venv/bin/python benchmarks/bench_pseudo_label.py --data data/benchmark   (part of `make bench`)

(b) images/s of the generator stage through Ray Data (one model per actor, CPU actors of
    one thread each) vs a bare single-process torch loop (one thread) over the same model
    and images; and Ray Data with 1 vs 2 actors.
(c) bytes per image of the label store vs the released format (one palette PNG per image).

Times include everything a user waits for: decoding, resizing, the forward pass and, for
Ray Data, scheduling and writing the Parquet parts (Ray itself is started beforehand).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
import ray
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.data.datasets import DataConfig, load_image  # noqa: E402
from pipeline.data.transforms import normalize  # noqa: E402
from pipeline.evaluation import predict_probs  # noqa: E402
from pipeline.label_store import LabelStore  # noqa: E402
from pipeline.labels import PALETTE  # noqa: E402
from pipeline.models import build_model, load_checkpoint, save_checkpoint  # noqa: E402
from pipeline.pseudo_label import PseudoLabelConfig, prediction_settings, predict, run  # noqa: E402


def bare_loop(cfg: PseudoLabelConfig, samples) -> float:
    """What the Ray Data stage does, in one process with one thread: images/s."""
    torch.set_num_threads(1)
    model = build_model(cfg.arch, cfg.num_classes)
    load_checkpoint(model, cfg.checkpoint)
    model.eval()
    w, h = cfg.size
    start = time.perf_counter()
    for s in samples:
        image = np.asarray(Image.fromarray(load_image(s.image)).resize((w, h), Image.BILINEAR))
        probs = predict_probs(model, normalize(torch.from_numpy(image[None])), output_size=(w, h))[0]
        conf, pred = probs.max(0)
        pred.to(torch.uint8).numpy().tobytes(), conf.numpy().astype("<f2").tobytes()
    return len(samples) / (time.perf_counter() - start)


def ray_data(cfg: PseudoLabelConfig, samples, workers: int) -> float:
    cfg.num_workers = workers
    cfg.store = tempfile.mkdtemp(prefix="bench-store-")
    settings = prediction_settings(cfg, samples)
    start = time.perf_counter()
    predict(cfg, samples, LabelStore(cfg.store), settings)
    return len(samples) / (time.perf_counter() - start)


def palette_png_bytes(label: np.ndarray) -> int:
    image = Image.fromarray(label, mode="L").convert("P")
    image.putpalette(PALETTE.ravel().tolist())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.tell()


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/benchmark", help="the built-in benchmark folder")
    parser.add_argument("--checkpoint", help="generator weights (default: a random small DeepLab-v2)")
    parser.add_argument("--size", default="512x256", help="pseudo-label size WxH (default 512x256)")
    parser.add_argument("--images", type=int, default=120)
    args = parser.parse_args()

    target = DataConfig("cityscapes", os.path.join(args.data, "target"), "train")
    samples = sorted(target.samples(), key=lambda s: s.name)[: args.images]
    checkpoint = args.checkpoint
    if checkpoint is None:
        torch.manual_seed(0)
        checkpoint = os.path.join(tempfile.mkdtemp(), "small.pt")
        save_checkpoint(checkpoint, build_model("deeplabv2_small", 19))
    w, h = map(int, args.size.split("x"))
    cfg = PseudoLabelConfig(target=target, store="", checkpoint=checkpoint, arch="deeplabv2_small",
                            size=(w, h), cpus_per_worker=1, part_size=32)

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"{len(samples)} target images at {w}x{h}, deeplabv2_small, CPU, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    ray_data(cfg, samples[:8], 1)  # warm Ray Data's workers up
    bare = bare_loop(cfg, samples)
    one = ray_data(cfg, samples, 1)
    two = ray_data(cfg, samples, 2)
    print("\n(b) pseudo-labelling throughput (generator stage)")
    print(f"  bare torch loop, 1 process:  {bare:7.2f} images/s")
    print(f"  Ray Data, 1 actor:           {one:7.2f} images/s  ({100 * one / bare:5.1f}% of the bare loop per worker)")
    print(f"  Ray Data, 2 actors:          {two:7.2f} images/s  ({100 * two / 2 / bare:5.1f}% per worker, "
          f"{two / one:.2f}x the 1-actor rate)")

    cfg.num_workers, cfg.store = 2, tempfile.mkdtemp(prefix="bench-full-")  # every target image
    manifest = run(cfg)
    n = manifest["num_images"]
    labels = folder_bytes(os.path.join(cfg.store, "labels"))
    predictions = folder_bytes(os.path.join(cfg.store, "predictions"))
    rows = LabelStore(cfg.store).read_labels(columns=["label", "height", "width"]).to_pylist()
    pngs = sum(palette_png_bytes(np.frombuffer(r["label"], np.uint8).reshape(r["height"], r["width"])) for r in rows)
    print("\n(c) label store size per image")
    print(f"  released format (palette PNG per image):       {pngs / n / 1024:8.1f} KiB")
    print(f"  label store, labels/ (what training reads):    {labels / n / 1024:8.1f} KiB  "
          f"({labels / pngs:.2f}x the PNGs)")
    print(f"  label store, predictions/ (argmax+confidence): {predictions / n / 1024:8.1f} KiB  "
          "(kept so labels can be re-selected without the model)")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
