"""Probe the built-in benchmark's design in one process, in minutes: no Ray, no files.

    python benchmarks/probe_benchmark.py                      # preconditions and 3 rounds
    python benchmarks/probe_benchmark.py --factors            # which part of the target's look costs what
    python benchmarks/probe_benchmark.py --target-look haze=0.5 --diagnostic correct_only

Renders the frames in memory, trains the demo's small DeepLab-v2 on the source frames
(configs/benchmark.yaml's model, crops, lr, Adam and cosine schedule), and prints: mIoU-19 on
held-out source frames, on its own training frames and on target val (P1, P2); with
--oracle, a model trained on the target's labels; then IAST rounds (IAS over each target
train image in order, the region-guided loss, the rounds' backbone lr ratio), each with the
precision and coverage of its pseudo-labels. --factors instead evaluates the source model
on target frames drawn with the source's look, switching one part of the target's look on
at a time. Meant for designing the benchmark; the demo (make demo) runs the real chain.
Numbers differ from the demo's by the data order and augmentation streams.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data import benchmark as B  # noqa: E402
from pipeline.data.transforms import model_input, normalize, train_transform  # noqa: E402
from pipeline.evaluation import ConfusionMatrix  # noqa: E402
from pipeline.labels import CITYSCAPES_ID_TO_TRAIN, CLASS_NAMES, IGNORE_INDEX  # noqa: E402
from pipeline.losses import cross_entropy, region_guided_loss  # noqa: E402
from pipeline.models import build_model, param_groups  # noqa: E402
from pipeline.models.deeplab import set_batchnorm_mode  # noqa: E402
from pipeline.selectors import IAS, select  # noqa: E402

LABEL_CLASSES = False  # --label-classes
SETS = ("source", "target_train", "target_val", "source_val")  # as pipeline.data.benchmark's


def _render(task):
    set_name, index, seed, dom = task
    image, ids = B.render(dom, np.random.default_rng([seed, SETS.index(set_name), index]))
    return image, CITYSCAPES_ID_TO_TRAIN[ids]


def render_sets(counts: dict[str, int], seed: int, target: B.Domain) -> dict[str, list]:
    with Pool(2) as pool:
        return {name: pool.map(_render, [(name, i, seed, B.SOURCE if name.startswith("source") else target)
                                         for i in range(n)], chunksize=8)
                for name, n in counts.items()}


def train(model, data, steps, lr, crop_heights, crop_size=(192, 96), seed=0, pseudo=False,
          backbone_lr_mult=1.0, ignored_weight=1.0, batch_size=8, anchor=None, anchor_weight=0.0,
          confident_weight=0.1):
    """``anchor``: labelled source frames whose cross-entropy (times ``anchor_weight``) is
    added each step (a diagnostic: does the round forget what the source taught?)."""
    transform = train_transform(tuple(crop_heights), (crop_size[1], crop_size[0]))
    source_transform = train_transform((70, 140), (crop_size[1], crop_size[0]))
    groups = param_groups(model, lr)
    groups[0]["lr"] = lr * backbone_lr_mult
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), weight_decay=5e-4)
    cosine = lambda s: 0.001 + 0.999 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    rng = np.random.default_rng(seed)
    model.train()
    for step in range(steps):
        pairs = [transform(*data[i], np.random.default_rng([seed, step, j]))
                 for j, i in enumerate(rng.integers(len(data), size=batch_size))]
        x, y = model_input(torch.stack([p[0] for p in pairs])), model_input(torch.stack([p[1] for p in pairs]))
        logits = model(x)
        loss = region_guided_loss(logits, y, IGNORE_INDEX, confident_weight, ignored_weight).total if pseudo else cross_entropy(logits, y)
        if anchor is not None and anchor_weight > 0:
            pairs = [source_transform(*anchor[i], np.random.default_rng([seed, step, j, 1]))
                     for j, i in enumerate(rng.integers(len(anchor), size=batch_size))]
            xs, ys = (model_input(torch.stack([p[k] for p in pairs])) for k in (0, 1))
            loss = loss + anchor_weight * cross_entropy(model(xs), ys)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model


@torch.no_grad()
def predict(model, data, batch=20) -> torch.Tensor:
    model.eval()
    probs = torch.cat([model(torch.stack([normalize(d[0]) for d in data[k:k + batch]])).softmax(1)
                       for k in range(0, len(data), batch)])
    model.train()
    return probs


def evaluate(model, data) -> ConfusionMatrix:
    cm = ConfusionMatrix(19)
    for pred, (_, label) in zip(predict(model, data).argmax(1).numpy(), data):
        cm.update(pred, label)
    return cm


def destinations(cm: ConfusionMatrix) -> str:
    """Each class's val pixels: the share predicted as the most frequent other class."""
    m = np.asarray(cm.matrix, np.float64)
    rows = m / np.maximum(m.sum(1, keepdims=True), 1)
    np.fill_diagonal(rows, 0)
    return "  val, each class's most frequent wrong prediction: " + ", ".join(
        f"{CLASS_NAMES[c]} as {CLASS_NAMES[rows[c].argmax()]} {100 * rows[c].max():.0f}%" for c in range(19)
        if rows[c].max() > 0)


def line(cm: ConfusionMatrix) -> str:
    iou = cm.iou()
    return f"{100 * np.nanmean(iou):5.1f} | " + " ".join(f"{CLASS_NAMES[c][:5]} {100 * iou[c]:.0f}" for c in range(19))


def pseudo_labels(model, data, alpha, gamma, diagnostic):
    """IAS over the images in order; returns (image, label) pairs, precision and coverage."""
    conf, argmax = predict(model, data).max(1)
    ias, pairs, right, kept = IAS(alpha, gamma=gamma), [], 0, 0
    per_class = np.zeros((3, 19))  # true pixels, kept pixels predicted c, of them right
    wrong = np.zeros((19, 19))  # kept pixels by (label, true class)
    for i, (image, truth) in enumerate(data):
        c, a = conf[i].numpy().astype(np.float16), argmax[i].numpy().astype(np.uint8)
        label = select(c, a, ias.update(c, a))
        known = (label != IGNORE_INDEX) & (truth != IGNORE_INDEX)
        right, kept = right + int((label[known] == truth[known]).sum()), kept + int(known.sum())
        per_class[0] += np.bincount(truth[truth != IGNORE_INDEX], minlength=19)
        per_class[1] += np.bincount(label[known], minlength=19)
        per_class[2] += np.bincount(label[known][label[known] == truth[known]], minlength=19)
        wrong += np.bincount(19 * label[known].astype(int) + truth[known], minlength=361).reshape(19, 19)
        if diagnostic == "correct_only":  # not a method: the wrong labels dropped
            label = np.where(label == truth, label, IGNORE_INDEX).astype(np.uint8)
        pairs.append((image, label))
    if LABEL_CLASSES:
        truth_share, kept_share = per_class[0] / per_class[0].sum(), per_class[1] / per_class[1].sum()
        print("  labels by class: kept share / true share, precision: " + " ".join(
            f"{CLASS_NAMES[c][:5]} {kept_share[c] / max(truth_share[c], 1e-9):.2f},{100 * per_class[2, c] / max(per_class[1, c], 1):.0f}"
            for c in range(19)), flush=True)
        np.fill_diagonal(wrong, 0)
        top = [k for k in np.argsort(wrong, axis=None)[::-1][:8] if wrong.flat[k] > 0]
        print("  wrong labels, share of all wrong: " + ", ".join(
            f"{CLASS_NAMES[t]} as {CLASS_NAMES[l]} {100 * wrong.flat[k] / wrong.sum():.0f}%"
            for k in top for l, t in [divmod(k, 19)]), flush=True)
    return pairs, right / max(kept, 1), float(np.mean([(p[1] != IGNORE_INDEX).mean() for p in pairs]))


def factors(model, seed: int, n: int) -> None:
    """The source model on target frames with the source's look, one part of the target's at a time."""
    looks = ("colors", "skies", "window", "sun", "texture", "saturation", "tint", "contrast", "gamma", "blur",
             "noise", "vignette", "jpeg_quality", "overcast", "look_jitter", "max_blur")
    base = replace(B.TARGET, **{k: getattr(B.SOURCE, k) for k in looks})  # the source's weather too
    groups = (("colors",), ("skies",), ("window",), ("sun",), ("texture",),
              ("saturation", "tint", "contrast", "gamma"), ("blur",), ("noise",), ("vignette",), ("jpeg_quality",))
    variants = {"target layout, source look": base}
    variants.update({"+ target " + "/".join(g): replace(base, **{k: getattr(B.TARGET, k) for k in g}) for g in groups})
    variants["the target"] = B.TARGET
    for name, dom in variants.items():
        frames = render_sets({"target_val": n}, seed, dom)["target_val"]
        print(f"{name:42s} {line(evaluate(model, frames))}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", default="400,300,100,100", help="source, target train, target val, source val")
    parser.add_argument("--steps", type=int, default=1000, help="source-only (and oracle) steps")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--oracle", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-steps", type=int, default=300)
    parser.add_argument("--round-lr", type=float, default=1e-4)
    parser.add_argument("--round-backbone-lr-mult", type=float, default=0.1)
    parser.add_argument("--round-batchnorm", default="train", choices=("train", "frozen_affine", "frozen"),
                        help="batch norm in the rounds (the released rounds: frozen_affine)")
    parser.add_argument("--alpha", default="0.5", help="IAS's alpha, or one per round: 0.2,0.25,0.3")
    parser.add_argument("--gamma", type=float, default=8.0)
    parser.add_argument("--ignored-weight", type=float, default=1.0)
    parser.add_argument("--confident-weight", type=float, default=0.1)
    parser.add_argument("--diagnostic", choices=("correct_only",))
    parser.add_argument("--source-anchor", type=float, default=0.0,
                        help="diagnostic: add this weight times the source cross-entropy to each round step")
    parser.add_argument("--factors", action="store_true")
    parser.add_argument("--label-classes", action="store_true",
                        help="print each round's labels by class: their share against the class's true share, and precision")
    parser.add_argument("--target-look", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--target-layout", nargs="*", default=[], metavar="KEY=VALUE",
                        help="other fields of the target's Domain, e.g. pedestrians=2.5")
    parser.add_argument("--arch", default="deeplabv2_small_os4", help="the model (configs/benchmark.yaml's)")
    parser.add_argument("--source-model", help="load (if it exists) or save the source model here")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a loaded machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global LABEL_CLASSES
    LABEL_CLASSES = args.label_classes
    torch.manual_seed(args.seed)
    target = B.with_look(B.TARGET, **{k: json.loads(v) for k, v in (i.split("=", 1) for i in args.target_look)})
    target = replace(target, **{k: json.loads(v) for k, v in (i.split("=", 1) for i in args.target_layout)})
    B.TARGET = target
    n_source, n_train, n_val, n_source_val = map(int, args.frames.split(","))

    start = time.perf_counter()
    data = render_sets({"source": n_source, "source_val": n_source_val, "target_train": n_train,
                        "target_val": n_val}, args.seed, target)
    print(f"rendered in {time.perf_counter() - start:.0f} s", flush=True)
    model = build_model(args.arch, 19)
    if args.source_model and Path(args.source_model).exists():
        model.load_state_dict(torch.load(args.source_model))
    else:
        start = time.perf_counter()
        train(model, data["source"], args.steps, args.lr, (70, 140), seed=args.seed)
        print(f"source-only: {args.steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
        if args.source_model:
            torch.save(model.state_dict(), args.source_model)
    held_out = evaluate(model, data["source_val"])
    print(f"{'source model, held-out source':42s} {line(held_out)}")
    if LABEL_CLASSES:
        print(destinations(held_out), flush=True)
    print(f"{'source model, its training frames':42s} {line(evaluate(model, data['source'][:n_source_val]))}")
    source_only = evaluate(model, data["target_val"])
    print(f"{'source model, target val':42s} {line(source_only)}", flush=True)
    if LABEL_CLASSES:
        print(destinations(source_only), flush=True)
    if args.factors:
        factors(model, args.seed, n_val)
        return 0
    if args.oracle:
        oracle = evaluate(train(build_model(args.arch, 19), data["target_train"], args.steps, args.lr,
                                (64, 128), seed=args.seed), data["target_val"])
        ratio = np.nanmean(source_only.iou()) / np.nanmean(oracle.iou())
        print(f"{'oracle, target val':42s} {line(oracle)}\nsource-only / oracle = {ratio:.2f}", flush=True)
    set_batchnorm_mode(model, args.round_batchnorm)
    for r in range(1, args.rounds + 1):
        alphas = [float(a) for a in args.alpha.split(",")]
        alpha = alphas[min(r, len(alphas)) - 1]
        pairs, precision, coverage = pseudo_labels(model, data["target_train"], alpha, args.gamma, args.diagnostic)
        train(model, pairs, args.round_steps, args.round_lr, (64, 128), seed=args.seed + r, pseudo=True,
              backbone_lr_mult=args.round_backbone_lr_mult, ignored_weight=args.ignored_weight,
              anchor=data["source"], anchor_weight=args.source_anchor, confident_weight=args.confident_weight)
        name = f"round {r} (labels: precision {100 * precision:.1f}, coverage {100 * coverage:.1f})"
        cm = evaluate(model, data["target_val"])
        print(f"{name:42s} {line(cm)}", flush=True)
        if LABEL_CLASSES:
            print(destinations(cm), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
