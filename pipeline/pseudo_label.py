"""Pseudo-labelling with Ray Data: generator predictions, then selection, into a label store.

Two stages, so that the labels do not depend on how many workers made them:

1. **Predict** (parallel). Ray Data decodes the target images in CPU tasks and runs the
   generator in an actor pool (one model per actor). Each actor runs the model one image
   at a time, so a prediction never depends on which images shared its batch. The
   driver receives the results in labelling order (``preserve_order``) and writes them
   as prediction parts of ``part_size`` images. Parts already written by a run with the
   same configuration are kept, so a crashed job resumes where it stopped.
2. **Select** (sequential, cheap). The actors also made each image's confidence
   histogram (selectors.sparse_histogram); the selector reads those alone, in labelling
   order, for the thresholds — IAS's are a running state over that order — then walks
   the predictions with them and writes the label parts, then the manifest that marks
   the store complete.

The labelling order is the canonical one (sorted by name), or with ``order:
released_permutation`` the released code's: a seeded permutation of the sorted list.
Either way it is fixed before prediction, so it does not depend on the workers either.

The store format is documented in :mod:`pipeline.label_store`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray
import torch
from PIL import Image
from tqdm import tqdm

from pipeline import selectors, storage
from pipeline.data.datasets import DataConfig, Sample, load_image, load_label
from pipeline.data.transforms import normalize
from pipeline.evaluation import predict_probs
from pipeline.label_store import LabelStore
from pipeline.labels import IGNORE_INDEX, NUM_CLASSES
from pipeline.models import build_model, load_checkpoint
from pipeline.visualize import preview_row, save_png

SELECTORS = ("ias", "cbst", "constant")
LABEL_VALUES = ("prediction", "ground_truth", "correct_only")
ORDERS = ("sorted", "released_permutation")
RESIZE_FILTERS = {"bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}


@dataclass
class SelectorConfig:
    """Which pixels become pseudo-labels (reference §1 and §3)."""

    name: str = "ias"
    alpha: float = 0.2  # IAS: selection proportion
    beta: float = 0.9  # IAS: threshold momentum
    gamma: float = 8.0  # IAS: hard-class exponent
    instance_size: int = 1  # IAS: images per instance (the released code used 2)
    portion: float = 0.2  # CBST: share of each class's pixels kept
    threshold: float = 0.9  # constant threshold
    # What a selected pixel is labelled with: the generator's class (the method), or, as
    # diagnostics that need the target's labels, its ground-truth class ("ground_truth":
    # wrong labels corrected) or the generator's class where it is right and nothing where
    # it is wrong ("correct_only": wrong labels dropped). The gap from the method to
    # "correct_only" is what the wrong labels cost as noise; from "correct_only" to
    # "ground_truth", what their true classes would teach besides.
    label_values: str = "prediction"

    def __post_init__(self):
        if self.name not in SELECTORS:
            raise ValueError(f"unknown selector {self.name!r}; choose one of {', '.join(SELECTORS)}")
        if self.label_values not in LABEL_VALUES:
            raise ValueError(f"unknown label_values {self.label_values!r}; choose one of {', '.join(LABEL_VALUES)}")

    def params(self) -> dict:
        """The parameters that matter for the chosen selector (for hashes and logs)."""
        keys = {
            "ias": ("alpha", "beta", "gamma", "instance_size"),
            "cbst": ("portion",),
            "constant": ("threshold",),
        }[self.name]
        params = {"name": self.name, **{k: getattr(self, k) for k in keys}}
        if self.label_values != "prediction":  # the method's stores keep their hashes
            params["label_values"] = self.label_values
        return params


@dataclass
class PseudoLabelConfig:
    target: DataConfig  # the target images to label (their labels, if any, only for statistics)
    store: str  # label store URI
    checkpoint: str  # generator weights, a checkpoint of ours (local path or URI)
    arch: str = "deeplabv2_resnet101"
    num_classes: int = NUM_CLASSES
    label_space: str = "cityscapes19"  # recorded in the manifest; training refuses a store of another
    size: tuple[int, int] = (1280, 640)  # pseudo-label size (width, height)
    test_sizes: tuple[tuple[int, int], ...] = ()  # multi-scale inference sizes; () = `size` only
    flip: bool = False
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    num_workers: int = 1  # actors, one model each
    gpus_per_worker: float = 0.0
    # fp16 autocast of the generator's forward pass on a GPU (no effect on the CPU): the
    # confidences are stored as float16 anyway, but a pixel near a threshold may flip, so
    # the prediction parts record it and fp16 and fp32 parts never mix.
    amp: bool = True
    cpus_per_worker: float = 1.0
    part_size: int = 64  # images per Parquet part (the unit of resumption)
    skip_unreadable: bool = False  # skip (and count) unreadable images instead of failing
    num_previews: int = 4
    round: int = 1
    # The order images are labelled in, which IAS's running thresholds follow: "sorted" (by
    # name) or "released_permutation", the released labelling loader's (a DistributedSampler
    # with shuffle=True, seed 0, epoch 0): torch.randperm of the sorted list, seeded order_seed.
    order: str = "sorted"
    order_seed: int = 0
    # PIL filter resizing the image to the generator's input; the released code used Lanczos
    # (Image.ANTIALIAS). The ground truth is always resized nearest neighbour.
    resize: str = "bilinear"

    def __post_init__(self):
        self.store = storage.absolute(self.store)
        self.checkpoint = storage.absolute(self.checkpoint)
        if self.order not in ORDERS:
            raise ValueError(f"unknown order {self.order!r}; choose one of {', '.join(ORDERS)}")
        if self.resize not in RESIZE_FILTERS:
            raise ValueError(f"unknown resize {self.resize!r}; choose one of {', '.join(RESIZE_FILTERS)}")


# -- stage 1: predictions --------------------------------------------------------------


def _input_size(cfg: PseudoLabelConfig) -> tuple[int, int]:
    """The size images are decoded at: the largest test size (by area) for multi-scale
    inference, so that no pass sees an image enlarged from a smaller copy; else `size`."""
    if not cfg.test_sizes:
        return tuple(cfg.size)
    return tuple(max(cfg.test_sizes, key=lambda s: s[0] * s[1]))


def _load_images(batch: dict, size: tuple[int, int], image_size: tuple[int, int] | None = None,
                 resize: str = "bilinear") -> dict:
    """Ray Data task: decode target images at ``image_size`` (default: ``size``, resized
    with the ``resize`` filter) and any ground truth at the pseudo-label ``size``.

    An unreadable file does not fail the task: its error travels with its row, so the
    driver first saves every finished part before it, then fails (or skips it). Each row
    carries its decoding time (``decode_s``) to the driver's timings.
    """
    w, h = size
    iw, ih = image_size or size
    n = len(batch["index"])
    images = np.zeros((n, ih, iw, 3), np.uint8)
    gts = np.full((n, h, w), IGNORE_INDEX, np.uint8)
    has_gt = np.zeros(n, bool)
    errors = np.full(n, "", dtype=object)
    seconds = np.zeros(n)
    image_filter = RESIZE_FILTERS[resize]
    for i in range(n):
        start = time.perf_counter()
        try:
            image = load_image(batch["image"][i])
            images[i] = np.asarray(Image.fromarray(image).resize((iw, ih), image_filter))
            if batch["label"][i]:
                label = load_label(batch["label"][i])
                gts[i] = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
                has_gt[i] = True
        except (OSError, ValueError) as err:
            errors[i] = str(err)
        seconds[i] = time.perf_counter() - start
    return {"index": batch["index"], "image": images, "ground_truth": gts, "has_gt": has_gt, "error": errors,
            "decode_s": seconds}


class _Predictor:
    """Ray Data actor: one generator model, run one image at a time."""

    def __init__(self, cfg: PseudoLabelConfig):
        # Same thread count in every actor: CPU kernels may reduce in a different order
        # with a different number of threads, and the labels must not depend on the pool.
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        self.device = torch.device("cuda" if torch.cuda.is_available() and cfg.gpus_per_worker > 0 else "cpu")
        self.model = build_model(cfg.arch, cfg.num_classes)
        load_checkpoint(self.model, cfg.checkpoint, label_space=cfg.label_space)
        self.model.to(self.device).eval()
        self.size = tuple(cfg.size)
        self.test_sizes = tuple(tuple(s) for s in cfg.test_sizes) or (self.size,)
        self.flip = cfg.flip
        self.amp = cfg.amp
        self.num_classes = cfg.num_classes

    def __call__(self, batch: dict) -> pa.Table:
        rows = []
        for i in range(len(batch["index"])):
            row = {"index": int(batch["index"][i]), "error": batch["error"][i],
                   "decode_s": float(batch["decode_s"][i]) if "decode_s" in batch else None}
            start = time.perf_counter()
            if not row["error"]:
                w, h = self.size
                # np.array copies: Ray Data hands a read-only view of its block when this
                # actor is not fused with the decoding task, which torch.from_numpy warns about.
                x = normalize(torch.from_numpy(np.array(batch["image"][i][None])).to(self.device))
                probs = predict_probs(self.model, x, sizes=self.test_sizes, flip=self.flip, output_size=(w, h),
                                      autocast=self.amp)[0]
                conf, pred = probs.max(dim=0)
                conf, pred = conf.half(), pred.to(torch.uint8)  # as stored
                # Here, beside the GPU, not on the driver: only the thresholds' recursion
                # over these histograms has to run in labelling order.
                cells, counts = selectors.sparse_histogram(conf, pred, self.num_classes)
                row["histogram_cells"] = cells.astype("<i4").tobytes()
                row["histogram_counts"] = counts.astype("<i4").tobytes()
                pred = pred.cpu().numpy()
                row["prediction"] = pred.tobytes()
                row["confidence"] = conf.cpu().numpy().astype("<f2").tobytes()
                row["class_pixels"] = np.bincount(pred.ravel(), minlength=self.num_classes).tolist()
                row["ground_truth"] = batch["ground_truth"][i].tobytes() if batch["has_gt"][i] else None
            row["forward_s"] = time.perf_counter() - start  # the model, argmax and the bytes
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=_PREDICTOR_SCHEMA)


_PREDICTOR_SCHEMA = pa.schema(
    [
        ("index", pa.int32()),
        ("error", pa.string()),
        ("prediction", pa.binary()),
        ("confidence", pa.binary()),
        ("class_pixels", pa.list_(pa.int64())),
        ("ground_truth", pa.binary()),
        ("histogram_cells", pa.binary()),
        ("histogram_counts", pa.binary()),
        ("decode_s", pa.float64()),
        ("forward_s", pa.float64()),
    ]
)


def _file_digest(uri: str) -> str:
    h = hashlib.sha256()
    with storage.open_file(uri, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prediction_settings(cfg: PseudoLabelConfig, samples: list[Sample]) -> dict:
    """Everything the predictions depend on; its hash names a compatible prediction part."""
    settings = {
        "generator_sha256": _file_digest(cfg.checkpoint),
        "generator": cfg.checkpoint,
        "arch": cfg.arch,
        "num_classes": cfg.num_classes,
        "size": list(cfg.size),
        "test_sizes": [list(s) for s in cfg.test_sizes],
        "flip": cfg.flip,
        "images_sha256": _hash([(s.name, s.image) for s in samples]),
        "target_fingerprint": cfg.target.fingerprint(),  # the images' and labels' contents
        "num_images": len(samples),
        "part_size": cfg.part_size,
    }
    # Only where they differ from the defaults, so that existing stores keep their hashes.
    if cfg.test_sizes:  # multi-scale predictions depend on the size the images are decoded at
        settings["input_size"] = list(_input_size(cfg))
    if cfg.skip_unreadable:  # parts written while skipping lack rows a strict run must fail on
        settings["skip_unreadable"] = True
    if cfg.order != "sorted":  # the parts hold other images, and IAS runs in another order
        settings["order"] = cfg.order
        settings["order_seed"] = cfg.order_seed
    if cfg.resize != "bilinear":  # another generator input
        settings["resize"] = cfg.resize
    if uses_autocast(cfg):  # other numerics (CPU actors never autocast: their stores keep their hashes)
        settings["autocast"] = "float16"
    return settings


def uses_autocast(cfg: PseudoLabelConfig) -> bool:
    """Whether the actors predict under fp16 autocast: amp set and the actors on GPUs."""
    return cfg.amp and cfg.gpus_per_worker > 0


def labelling_order(samples: list[Sample], order: str, seed: int = 0) -> list[Sample]:
    """``samples`` (sorted by name) in the order they are labelled (see PseudoLabelConfig.order)."""
    if order == "sorted":
        return list(samples)
    permutation = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
    return [samples[i] for i in permutation.tolist()]


def _ray_actor_args(cfg: PseudoLabelConfig) -> dict:
    if cfg.gpus_per_worker > 0:
        return {"num_gpus": cfg.gpus_per_worker, "num_cpus": cfg.cpus_per_worker}
    return {"num_cpus": cfg.cpus_per_worker}


def predict(cfg: PseudoLabelConfig, samples: list[Sample], store: LabelStore, settings: dict,
            timings: dict | None = None) -> int:
    """Stage 1: write every missing prediction part; returns how many parts were reused.
    ``timings``, if given, receives the seconds spent decoding and in the model (summed over
    the images, in the tasks and actors), writing parts (on the driver) and in all (wall)."""
    config_hash = _hash(settings)
    num_parts = math.ceil(len(samples) / cfg.part_size)
    done = store.finished_prediction_parts(num_parts, config_hash)
    todo = [i for i, _ in enumerate(samples) if i // cfg.part_size not in done]
    if not todo:
        return len(done)
    timings = {} if timings is None else timings
    timings.update(images=0, decode_s=0.0, forward_s=0.0, write_s=0.0)
    wall = time.perf_counter()

    def write(part: int, rows: list[dict]) -> None:
        start = time.perf_counter()
        store.write_predictions(part, rows, metadata)
        timings["write_s"] += time.perf_counter() - start

    items = [
        {"index": i, "image": samples[i].image, "label": samples[i].label or ""}
        for i in todo
    ]
    ctx = ray.data.DataContext.get_current()
    previous_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # parts are written in labelling order
    try:
        ds = (
            ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 8 * cfg.num_workers)))
            .map_batches(_load_images, fn_args=(tuple(cfg.size), _input_size(cfg), cfg.resize), batch_size=8)
            .map_batches(
                _Predictor,
                fn_constructor_args=(cfg,),
                batch_size=4,
                compute=ray.data.ActorPoolStrategy(size=cfg.num_workers),
                # a lost node's actor restarts elsewhere and its batches are retried there
                # (Ray Data's defaults, kept explicit: test_multinode's node-loss test needs them)
                max_restarts=-1, max_task_retries=-1,
                **_ray_actor_args(cfg),
            )
        )
        metadata = {"config_hash": config_hash, "settings": settings}
        pending: list[dict] = []
        part = todo[0] // cfg.part_size
        with tqdm(total=len(samples), initial=len(samples) - len(todo), desc="pseudo-label: predict", unit="img") as bar:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for row in batch.to_pylist():
                    index = row["index"]
                    if index // cfg.part_size != part:
                        write(part, pending)
                        pending, part = [], index // cfg.part_size
                    sample = samples[index]
                    if row["error"] and not cfg.skip_unreadable:
                        raise ValueError(
                            f"{row['error']}\nFix or remove the file, or set skip_unreadable=true to "
                            "skip unreadable images (they are listed in the manifest). Finished parts "
                            "are kept: a re-run resumes after them."
                        )
                    if not row["error"]:  # a skipped unreadable image gets no row
                        timings["images"] += 1
                        timings["decode_s"] += row["decode_s"] or 0.0
                        timings["forward_s"] += row["forward_s"]
                        pending.append(
                            {
                                "index": index,
                                "name": sample.name,
                                "image": sample.image,
                                "height": cfg.size[1],
                                "width": cfg.size[0],
                                **{k: row[k] for k in ("prediction", "confidence", "class_pixels", "ground_truth",
                                                       "histogram_cells", "histogram_counts")},
                            }
                        )
                    bar.update(1)
            write(part, pending)
    finally:
        ctx.execution_options.preserve_order = previous_order
    timings["wall_s"] = time.perf_counter() - wall
    return len(done)


# -- stage 2: selection ------------------------------------------------------------------


def _thresholds(sel: SelectorConfig, histograms: list[tuple], num_classes: int) -> np.ndarray:
    """(images, classes): the per-class thresholds each image is selected with, in labelling
    order, from the histograms the actors made (IAS's recursion over them is all that runs
    in order, on the driver)."""
    thetas = np.empty((len(histograms), num_classes), np.float64)
    if sel.name == "constant":
        thetas[:] = np.float32(sel.threshold)
    elif sel.name == "cbst":
        # CBST's thresholds need the whole target set first; they are applied to the stored
        # top-1 prediction (conf >= theta[argmax]), since the store keeps no full softmax.
        thetas[:] = selectors.cbst_thresholds(selectors.dense_histogram(histograms, num_classes), sel.portion)
    else:
        ias = selectors.IAS(sel.alpha, sel.beta, sel.gamma, num_classes)
        for start in range(0, len(histograms), sel.instance_size):
            instance = histograms[start:start + sel.instance_size]
            thetas[start:start + sel.instance_size] = ias.update_from_histogram(
                selectors.dense_histogram(instance, num_classes))
    return thetas


def _label_part(store_uri: str, part: int, thetas: np.ndarray, label_values: str, num_classes: int,
                num_previews: int, metadata: dict) -> dict:
    """One prediction part's labels, selected with each image's thresholds and written as
    its labels part (a Ray task: parts are labelled side by side). Returns the part's
    totals, each image's kept-confidence sums (the driver's in-order difficulty EMA), its
    names and up to ``num_previews`` (record, label) pairs."""
    store, k = LabelStore(store_uri), num_classes
    records = store.part_predictions(part)
    totals = {key: np.zeros(k, np.int64) for key in ("class_pixels", "class_kept", "class_correct", "class_judged")}
    rows, kept_sums, previews = [], [], []
    for r, theta in zip(records, thetas, strict=True):
        label = selectors.select(r.confidence, r.prediction, theta)
        if label_values != "prediction":
            if r.ground_truth is None:
                raise ValueError(f"selector.label_values={label_values}: no ground truth was read for {r.image}")
            keep = label != IGNORE_INDEX
            if label_values == "ground_truth":
                label = np.where(keep, r.ground_truth, IGNORE_INDEX).astype(np.uint8)
            else:
                label = np.where(keep & (label == r.ground_truth), label, IGNORE_INDEX).astype(np.uint8)
        kept = np.bincount(label[label != IGNORE_INDEX], minlength=k)[:k]
        kept_sums.append(selectors.ClassConfidence.kept_sums(r.confidence, label, k))
        correct = None
        if r.ground_truth is not None:  # precision over kept pixels that have ground truth
            judged = (label != IGNORE_INDEX) & (r.ground_truth != IGNORE_INDEX)
            correct = np.bincount(label[judged & (label == r.ground_truth)], minlength=k)[:k]
            totals["class_correct"] += correct
            totals["class_judged"] += np.bincount(label[judged], minlength=k)[:k]
        totals["class_pixels"] += r.class_pixels
        totals["class_kept"] += kept
        rows.append({
            "index": r.index, "name": r.name, "image": r.image,
            "height": label.shape[0], "width": label.shape[1],
            "label": label.tobytes(),
            "thresholds": theta.astype(np.float32).tolist(),
            "class_pixels": r.class_pixels.tolist(),
            "class_kept": kept.tolist(),
            "class_correct": None if correct is None else correct.tolist(),
        })
        if len(previews) < num_previews:
            previews.append((r, label))
    start = time.perf_counter()
    # A part whose images were all skipped as unreadable still gets its (empty) labels
    # part: readers open every part the manifest counts.
    store.write_labels(part, rows, metadata)
    return {"totals": totals, "kept_sums": kept_sums, "names": [r.name for r in records], "previews": previews,
            "write_s": time.perf_counter() - start}


def select(cfg: PseudoLabelConfig, store: LabelStore, num_parts: int, num_images: int, metadata: dict) -> dict:
    """Stage 2: the selector's thresholds for every image, in labelling order, on the
    driver (from the actors' histograms, without the maps); then each part's labels, in
    Ray tasks side by side (``_label_part``). The result's ``seconds``: in all and the
    parts' writing (summed over the tasks)."""
    wall, k = time.perf_counter(), cfg.num_classes
    histograms = [store.part_histograms(part) for part in range(num_parts)]
    sizes = [len(h) for h in histograms]
    thetas = _thresholds(cfg.selector, [h for part in histograms for h in part], k)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    label_part = ray.remote(num_cpus=1, max_retries=3)(_label_part)  # a part is written whole or not at all
    pending = {
        label_part.remote(store.uri, part, thetas[starts[part]:starts[part + 1]], cfg.selector.label_values, k,
                          max(0, cfg.num_previews - int(starts[part])), metadata): part
        for part in range(num_parts)
    }
    done: dict[int, dict] = {}
    with tqdm(total=num_images, desc="pseudo-label: select", unit="img") as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            part = pending.pop(ready[0])
            done[part] = ray.get(ready[0])
            bar.update(sizes[part])
    totals = {key: np.zeros(k, np.int64) for key in ("class_pixels", "class_kept", "class_correct", "class_judged")}
    difficulty = selectors.ClassConfidence(k)
    previews, names = [], []
    for part in range(num_parts):  # in labelling order, as the difficulty EMA needs
        result = done[part]
        for key in totals:
            totals[key] += result["totals"][key]
        for counts, sums in result["kept_sums"]:
            difficulty.update_from_sums(counts, sums)
        names += result["names"]
        previews += result["previews"]  # each part sent only what the earlier ones left to fill
    final = thetas[-1] if len(thetas) else np.full(k, np.nan)
    return {"totals": totals, "final_thresholds": final, "confidence": difficulty.value,
            "previews": previews, "names": names,
            "seconds": {"wall_s": time.perf_counter() - wall, "write_s": sum(r["write_s"] for r in done.values())}}


def selection_statistics(totals: dict, final_thresholds: np.ndarray, confidence: np.ndarray) -> dict:
    """Per-class coverage, precision (where ground truth exists), thresholds, and HIAST's
    confidence EMA of the kept pixels (None for a class that kept none)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        coverage = totals["class_kept"] / totals["class_pixels"]
        precision = totals["class_correct"] / totals["class_judged"]
    has_gt = totals["class_judged"].sum() > 0
    return {
        "coverage": [None if np.isnan(v) else float(v) for v in coverage],
        "precision": [None if (np.isnan(v) or not has_gt) else float(v) for v in precision],
        "thresholds": [float(v) for v in final_thresholds],
        "confidence": [None if np.isnan(v) else float(v) for v in confidence],
        "pixels": totals["class_pixels"].tolist(),
        "kept": totals["class_kept"].tolist(),
        "coverage_all": float(totals["class_kept"].sum() / max(1, totals["class_pixels"].sum())),
        "precision_all": (
            float(totals["class_correct"].sum() / max(1, totals["class_judged"].sum())) if has_gt else None
        ),
    }


def write_previews(previews, store_uri: str, space: str = "cityscapes19") -> list[str]:
    """PNG per preview image: image | pseudo-label | ground truth (where present)."""
    paths = []
    for record, label in previews:
        image = np.asarray(
            Image.fromarray(load_image(record.image)).resize(label.shape[::-1], Image.BILINEAR)
        )
        maps = [label] + ([record.ground_truth] if record.ground_truth is not None else [])
        uri = storage.join(store_uri, "previews", f"{record.index:05d}_{record.name}.png")
        save_png(preview_row(image, *maps, space=space), uri)
        paths.append(uri)
    return paths


def run(cfg: PseudoLabelConfig) -> dict:
    """Make (or resume, or reuse) the label store of ``cfg``; returns its manifest."""
    # The canonical order (by name), then the labelling order: prediction parts and the
    # selection follow it, whatever the number of workers.
    samples = labelling_order(sorted(cfg.target.samples(), key=lambda s: s.name), cfg.order, cfg.order_seed)
    if not samples:
        raise ValueError(f"no target images to pseudo-label in {cfg.target.root} ({cfg.target.split})")
    if not storage.exists(cfg.checkpoint):
        raise FileNotFoundError(f"generator checkpoint {cfg.checkpoint} not found")
    unlabelled = [s.name for s in samples if s.label is None] if cfg.selector.label_values != "prediction" else []
    if unlabelled:
        raise ValueError(
            f"selector.label_values={cfg.selector.label_values} needs the target's labels, but {len(unlabelled)} image(s) of "
            f"{cfg.target.root} ({cfg.target.split}) have none, e.g. {unlabelled[0]}: use a labelled split "
            "or label_values=prediction"
        )
    store = LabelStore(cfg.store)
    settings = prediction_settings(cfg, samples)
    selection = cfg.selector.params()
    config_hash = _hash({"predictions": settings, "selector": selection, "round": cfg.round})
    if store.is_complete():
        manifest = store.manifest()
        if manifest.get("config_hash") == config_hash:
            return manifest  # already made with these settings: nothing to do
        raise FileExistsError(
            f"label store {cfg.store} is complete but was made with other settings "
            f"(config hash {manifest.get('config_hash')} vs {config_hash}); choose another store "
            "path or delete it to regenerate"
        )
    prediction_timings: dict = {}
    parts_reused = predict(cfg, samples, store, settings, prediction_timings)
    num_parts = math.ceil(len(samples) / cfg.part_size)
    metadata = {"config_hash": config_hash, "selector": selection, "round": cfg.round}
    result = select(cfg, store, num_parts, len(samples), metadata)
    labelled = set(result["names"])
    skipped = [s.name for s in samples if s.name not in labelled]
    stats = selection_statistics(result["totals"], result["final_thresholds"], result["confidence"])
    preview_uris = write_previews(result["previews"], cfg.store, cfg.label_space)
    manifest = {
        "config_hash": config_hash,
        "round": cfg.round,
        "generator": {"checkpoint": cfg.checkpoint, "sha256": settings["generator_sha256"], "arch": cfg.arch},
        "selector": selection,
        "prediction_settings": settings,
        "num_classes": cfg.num_classes,
        "label_space": cfg.label_space,
        "num_images": len(labelled),
        "num_parts": num_parts,
        "part_size": cfg.part_size,
        "skipped_unreadable": skipped,
        "prediction_parts_reused": parts_reused,
        # Where the time went (pipeline.rehearsal reports it): the predictions made by this
        # run (none when every part was reused) and the selection.
        "timings": {"predict": prediction_timings, "select": result["seconds"]},
        "statistics": stats,
        "previews": preview_uris,
    }
    store.commit(manifest)
    return store.manifest()
