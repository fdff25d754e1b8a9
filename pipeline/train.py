"""Training stages run by Ray Train's TorchTrainer with DDP (reference §5).

- ``source_only``: cross-entropy on the labelled source set;
- ``adversarial``: output-space adversarial warm-up (LSGAN) from a source-only model;
- ``self_training``: one IAST round on the target images and a label store, with the
  region-guided loss (target only, as in the released code); with ``teacher_momentum``
  set, HIAST's version: the student learns on strong views of the images, and an EMA
  teacher's predictions on the weak views supervise the pixels without a pseudo-label;
  with ``hard_classes`` set, every sample first receives the pseudo-labelled pixels of
  the hardest classes from a donor image of the store (HIAST's hard-aware augmentation);
- ``oracle``: supervised on the labelled target set (the benchmark's upper bound).

Each worker reads its own shard of the data with a per-worker DataLoader; the stream of
samples is a function of (seed, worker rank, position), so a resumed run continues the
same stream. Checkpoints (model, optimiser, scheduler, step, config) go to the run's
storage path every ``checkpoint_every`` steps and at the end; a re-run with the same
name resumes from the last one, and Ray Train's FailureConfig restarts failed workers
from it.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import config as config_lib
from pipeline import distributed, selectors, storage
from pipeline.data.datasets import DataConfig, Sample, load_image, load_label
from pipeline.data.transforms import (
    HardClassPaste,
    eval_transform,
    hard_class_donors,
    train_transform,
    weak_strong_transform,
)
from pipeline.evaluation import ConfusionMatrix, predict_probs
from pipeline.label_store import LabelStore, decode_label
from pipeline.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from pipeline.losses import (
    adversarial_loss,
    consistency_loss,
    cross_entropy,
    discriminator_loss,
    region_guided_loss,
)
from pipeline.models import (
    build_model,
    load_checkpoint,
    load_iast_checkpoint,
    load_imagenet_backbone,
    param_groups,
    save_checkpoint,
    set_batchnorm_mode,
)
from pipeline.models.discriminator import OutputSpaceDiscriminator

CHECKPOINT_FILE = "checkpoint.pt"
Stage = Literal["source_only", "adversarial", "self_training", "oracle"]


@dataclass
class TrainConfig:
    stage: Stage
    name: str  # run name: a re-run with the same name and storage resumes
    storage: str  # Ray Train storage path (local folder or s3://)
    iterations: int
    lr: float
    arch: str = "deeplabv2_resnet101"
    num_classes: int = NUM_CLASSES
    init: str | None = None  # start from this checkpoint (ours or a released IAST one)
    init_format: Literal["ours", "iast"] = "ours"
    imagenet_backbone: str | None = None  # torchvision ResNet weights, when init is None
    batchnorm: Literal["train", "frozen_affine", "frozen"] = "train"
    source: DataConfig | None = None  # labelled (source_only, adversarial)
    target: DataConfig | None = None  # images (adversarial), labelled (oracle)
    label_store: str | None = None  # pseudo-labels (self_training)
    val: DataConfig | None = None  # labelled target val, evaluated at the end
    batch_size: int = 8  # global, split over the workers
    backbone_lr_mult: float = 0.1
    weight_decay: float = 5e-4
    final_lr_ratio: float = 0.001  # cosine schedule from lr to final_lr_ratio * lr
    crop_size: tuple[int, int] = (1024, 512)  # (width, height) fed to the network
    source_crop_heights: tuple[int, int] = (341, 950)  # random sized crop, pixels
    target_crop_heights: tuple[int, int] = (341, 1000)
    confident_weight: float = 0.1  # region-guided regularisation (self_training)
    ignored_weight: float = 3.0
    # HIAST (self_training only): EMA momentum of the teacher, updated every step; None
    # trains IAST's way (one view, no teacher).
    teacher_momentum: float | None = None
    consistency_weight: float = 0.5  # of L_cst, with a teacher
    # HIAST (self_training only): paste the pseudo-labelled pixels of this many hardest
    # classes (lowest confidence EMA in the label store) from a donor image into every
    # sample; 0: no pasting. HIAST uses 14.
    hard_classes: int = 0
    adversarial_weight: float = 0.05
    discriminator_lr: float = 2e-5
    checkpoint_every: int = 500
    log_every: int = 50
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    loader_workers: int = 2  # DataLoader processes per training worker
    decoded_cache_mb: float = 0  # decoded samples kept in memory per loader (see DecodedCache)
    amp: bool = True  # mixed precision (GPU only)
    max_failures: int = 2
    seed: int = 888
    eval_size: tuple[int, int] | None = None  # (width, height) for validation; None: label size

    def __post_init__(self):
        for key in ("storage", "init", "imagenet_backbone", "label_store"):
            setattr(self, key, storage.absolute(getattr(self, key)))
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.teacher_momentum is not None:
            if self.stage != "self_training":
                raise ValueError(f"teacher_momentum applies to self_training only, not to {self.stage}")
            if not 0 <= self.teacher_momentum < 1:
                raise ValueError(f"teacher_momentum must be in [0, 1), got {self.teacher_momentum}")
        if self.hard_classes:
            if self.stage != "self_training":
                raise ValueError(f"hard_classes applies to self_training only, not to {self.stage}")
            if not 0 < self.hard_classes <= self.num_classes:
                raise ValueError(f"hard_classes must be in 0..{self.num_classes}, got {self.hard_classes}")
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by num_workers {self.num_workers}"
            )


def check_config(cfg: TrainConfig) -> None:
    """Fail fast, on the driver, before any worker starts: data present, store compatible."""
    storage.check_uri(cfg.storage)
    needs = {
        "source_only": ("source",),
        "adversarial": ("source", "target"),
        "self_training": ("label_store",),
        "oracle": ("target",),
    }[cfg.stage]
    for key in needs:
        if getattr(cfg, key) is None:
            raise ValueError(f"stage {cfg.stage} needs `{key}` in its config")
    labelled = {"source", "val"} | ({"target"} if cfg.stage == "oracle" else set())
    for key in ("source", "target", "val"):
        data = getattr(cfg, key)
        if data is None:
            continue
        samples = data.samples()  # raises with the fix when the prepared list is missing
        if not samples:
            raise ValueError(f"{key}: {data.dataset} {data.split} at {data.root} holds no images")
        if key in labelled and samples[0].label is None:
            raise ValueError(f"{key}: {data.dataset} {data.split} at {data.root} has no labels")
    if cfg.label_store:
        manifest = LabelStore(cfg.label_store).manifest()
        if manifest["num_classes"] != cfg.num_classes:
            raise ValueError(
                f"label store {cfg.label_store} has {manifest['num_classes']} classes but the model "
                f"is configured for {cfg.num_classes}; regenerate the labels or fix num_classes"
            )
        if cfg.hard_classes and manifest.get("statistics", {}).get("confidence") is None:
            raise ValueError(
                f"label store {cfg.label_store} holds no per-class confidence (it predates hard-class "
                "pasting): regenerate it with jobs/pseudo_label.py, or set hard_classes to 0"
            )
    for key in ("init", "imagenet_backbone"):
        uri = getattr(cfg, key)
        if uri and not storage.exists(uri):
            raise FileNotFoundError(f"{key}: checkpoint file {uri} not found")


# -- data ---------------------------------------------------------------------------------


class _Stream(torch.utils.data.Dataset):
    """Position ``k`` of this worker's endless sample stream -> transformed sample.

    The global position g = k * world + rank walks epochs of a seeded permutation, so
    workers see disjoint shards of every epoch and the stream resumes exactly from a step.
    """

    def __init__(self, load: Callable[[int], tuple], size: int, transform, seed: int, rank: int, world: int):
        self.load, self.size, self.transform = load, size, transform
        self.seed, self.rank, self.world = seed, rank, world

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int):
        g = k * self.world + self.rank
        epoch, pos = divmod(g, self.size)
        index = int(np.random.default_rng([self.seed, epoch]).permutation(self.size)[pos])
        image, label = self.load(index)
        return self.transform(image, label, np.random.default_rng([self.seed, g, 1]))


class _From(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        k = self.start
        while True:
            yield k
            k += 1


class DecodedCache:
    """``load(i)`` with the decoded arrays kept in memory up to ``budget_mb``: a small
    dataset (the built-in benchmark's 400 frames are ~45 MB) is decoded once instead of
    once per sample, which on two cores is a quarter of a training step. Beyond the budget
    samples are decoded as before. Cached arrays are read-only, so a transform that wrote
    into its input would fail instead of corrupting the cache."""

    def __init__(self, load: Callable[[int], tuple], budget_mb: float):
        self.load, self.budget, self.used = load, budget_mb * 2**20, 0
        self.items: dict[int, tuple] = {}

    def __call__(self, index: int) -> tuple:
        sample = self.items.get(index)
        if sample is None:
            sample = self.load(index)
            size = sum(a.nbytes for a in sample)
            if self.used + size <= self.budget:
                for array in sample:
                    array.flags.writeable = False
                self.items[index] = sample
                self.used += size
        return sample


def _labelled_loader(samples: list[Sample]):
    def load(i: int):
        return load_image(samples[i].image), load_label(samples[i].label)

    return load, len(samples)


def _unlabelled_loader(samples: list[Sample]):
    def load(i: int):
        image = load_image(samples[i].image)
        return image, np.full(image.shape[:2], IGNORE_INDEX, np.uint8)

    return load, len(samples)


def _pseudo_labelled_loader(store_uri: str):
    rows = LabelStore(store_uri).read_labels(columns=["image", "label", "height", "width"]).to_pylist()

    def load(i: int):
        row = rows[i]
        label = decode_label(row)
        image = load_image(row["image"])
        # Labels live at the pseudo-label size (e.g. 1280x640); the image keeps its own
        # (2048x1024), so the crop heights of §5 mean what they say: the label is enlarged,
        # nearest neighbour, as the released code does.
        if image.shape[:2] != label.shape:
            label = np.asarray(Image.fromarray(label).resize(image.shape[1::-1], Image.NEAREST))
        return image, label

    return load, len(rows)


def _hard_class_paste(store_uri: str, load: Callable[[int], tuple], num_hard: int) -> HardClassPaste:
    """HIAST's pasting over a label store: its hardest classes and their donor images."""
    store = LabelStore(store_uri)
    hard, probs = selectors.hard_classes(store.manifest()["statistics"]["confidence"], num_hard)
    kept = np.array(store.read_labels(columns=["class_kept"]).column("class_kept").to_pylist(), np.int64)
    paste = HardClassPaste(hard, probs, hard_class_donors(kept, hard), load)
    if not len(paste.classes) and distributed.rank() == 0:
        print(f"warning: label store {store_uri} keeps no pixel to paste; training without hard-class pasting",
              flush=True)
    return paste


def _loader(source, crop_heights, cfg: TrainConfig, start: int, salt: int, two_views: bool = False,
            first=()):
    """Batches of (image, label), or of (weak, strong, label) with ``two_views``; ``first``:
    transforms applied to the loaded sample before the augmentation."""
    load, size = source
    if cfg.decoded_cache_mb > 0:
        load = DecodedCache(load, cfg.decoded_cache_mb)
    rank, world = distributed.rank(), distributed.world_size()
    make = weak_strong_transform if two_views else train_transform
    transform = make(tuple(crop_heights), (cfg.crop_size[1], cfg.crop_size[0]), first=first)
    dataset = _Stream(load, size, transform, cfg.seed + salt, rank, world)
    per_worker = cfg.batch_size // world
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=per_worker,
        sampler=_From(start * per_worker),
        num_workers=cfg.loader_workers,
        pin_memory=cfg.use_gpu,
        persistent_workers=cfg.loader_workers > 0,
        prefetch_factor=4 if cfg.loader_workers > 0 else None,
    )
    return iter(loader)


# -- model and optimisation -----------------------------------------------------------------


def _build(cfg: TrainConfig):
    model = build_model(cfg.arch, cfg.num_classes)
    if cfg.init and cfg.init_format == "iast":
        load_iast_checkpoint(model, cfg.init)
    elif cfg.init:
        load_checkpoint(model, cfg.init)
    elif cfg.imagenet_backbone:
        load_imagenet_backbone(model, cfg.imagenet_backbone)
    set_batchnorm_mode(model, cfg.batchnorm)
    groups = param_groups(model, cfg.lr)
    for group in groups:
        if group["name"] == "backbone":
            group["lr"] = cfg.lr * cfg.backbone_lr_mult
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)

    def cosine(step: int) -> float:
        progress = min(step, cfg.iterations) / cfg.iterations
        return cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    return model, optimizer, scheduler


def _make_teacher(model: torch.nn.Module) -> torch.nn.Module:
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """teacher <- momentum·teacher + (1 - momentum)·student, for the weights and the
    BatchNorm statistics alike (the teacher runs in eval mode, on its own statistics);
    integer buffers (BN's batch counters) are copied."""
    taught = student.state_dict()
    for name, value in teacher.state_dict().items():
        if value.dtype.is_floating_point:
            value.mul_(momentum).add_(taught[name].detach(), alpha=1 - momentum)
        else:
            value.copy_(taught[name])


def _save(cfg, step, model, optimizer, scheduler, extra_modules, metrics):
    """Rank 0 writes the checkpoint; every rank reports (Ray Train needs all of them)."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if distributed.rank() == 0:
            extras = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "config": config_lib.to_dict(cfg),
            }
            for name, (module, opt) in extra_modules.items():
                extras[name] = module.state_dict()
                if opt is not None:
                    extras[f"{name}_optimizer"] = opt.state_dict()
            save_checkpoint(os.path.join(tmp, CHECKPOINT_FILE), distributed.unwrap(model), **extras)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"step": step, **metrics}, checkpoint=checkpoint)


def _restore(model, optimizer, scheduler, extra_modules) -> int:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as path:
        state = load_checkpoint(distributed.unwrap(model), os.path.join(path, CHECKPOINT_FILE))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for name, (module, opt) in extra_modules.items():
        module.load_state_dict(state[name])
        if opt is not None:
            opt.load_state_dict(state[f"{name}_optimizer"])
    return int(state["step"])


# -- evaluation -------------------------------------------------------------------------------


def evaluate_shard(model, samples: list[Sample], cfg: TrainConfig, device) -> ConfusionMatrix:
    """Every worker evaluates its share of ``samples``; the confusion matrices are summed."""
    cm = ConfusionMatrix(cfg.num_classes)
    rank, world = distributed.rank(), distributed.world_size()
    net = distributed.unwrap(model)
    distributed.broadcast_buffers(net)  # every shard is evaluated with the saved model's statistics
    normalize = eval_transform()
    for sample in samples[rank::world]:
        label = load_label(sample.label)
        image, _ = normalize(load_image(sample.image), label, None)
        sizes = [tuple(cfg.eval_size)] if cfg.eval_size else None
        probs = predict_probs(net, image[None], sizes=sizes, output_size=label.shape[::-1])
        cm.update(probs.argmax(1)[0].cpu().numpy(), label)
    return ConfusionMatrix(cfg.num_classes, distributed.sum_array(cm.matrix, device))


# -- the loop ---------------------------------------------------------------------------------


def train_loop(loop_config: dict) -> None:
    """Ray Train worker function. ``loop_config``: {"config": TrainConfig dict, and optionally
    "on_step": a callable(step, model) run after every step (the tests inject faults with it)}."""
    cfg = config_lib.from_dict(TrainConfig, loop_config["config"])
    on_step = loop_config.get("on_step")
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    rank = distributed.rank()

    model, optimizer, scheduler = _build(cfg)
    extra_modules = {}  # name -> (module, its optimizer or None), checkpointed with the model
    teacher = None
    if cfg.teacher_momentum is not None:  # a fresh copy of the round's initial weights
        teacher = _make_teacher(model).to(device)
        extra_modules["teacher"] = (teacher, None)
    if cfg.stage == "adversarial":
        discriminator = OutputSpaceDiscriminator(cfg.num_classes).to(device)
        d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=cfg.discriminator_lr, betas=(0.9, 0.99))
        extra_modules["discriminator"] = (discriminator, d_optimizer)
    model = ray.train.torch.prepare_model(model)
    start = _restore(model, optimizer, scheduler, extra_modules)

    if cfg.stage in ("source_only", "adversarial"):
        main = _loader(_labelled_loader(cfg.source.samples()), cfg.source_crop_heights, cfg, start, 0)
    elif cfg.stage == "oracle":
        main = _loader(_labelled_loader(cfg.target.samples()), cfg.target_crop_heights, cfg, start, 0)
    else:
        pseudo = _pseudo_labelled_loader(cfg.label_store)
        paste = [_hard_class_paste(cfg.label_store, pseudo[0], cfg.hard_classes)] if cfg.hard_classes else []
        main = _loader(pseudo, cfg.target_crop_heights, cfg, start, 0, two_views=teacher is not None, first=paste)
    target = None
    if cfg.stage == "adversarial":
        target = _loader(_unlabelled_loader(cfg.target.samples()), cfg.target_crop_heights, cfg, start, 1)

    use_amp = cfg.amp and cfg.use_gpu
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    d_scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    autocast = lambda: torch.autocast("cuda", dtype=torch.float16, enabled=use_amp)  # noqa: E731

    if rank == 0:
        print(f"[{cfg.name}] {cfg.stage}: steps {start}->{cfg.iterations}, {distributed.world_size()} worker(s), "
              f"batch {cfg.batch_size}, batchnorm={cfg.batchnorm}, device={device}", flush=True)
    model.train()
    sums: dict[str, float] = {}
    metrics = None
    wait = busy = 0.0
    t_log = time.perf_counter()
    for step in range(start + 1, cfg.iterations + 1):
        t0 = time.perf_counter()
        batch = next(main)
        xt = next(target)[0] if target is not None else None
        t1 = time.perf_counter()
        batch = [t.to(device, non_blocking=True) for t in batch]
        x, y = batch[-2], batch[-1]  # with a teacher, batch = (weak, strong, label): x is strong
        optimizer.zero_grad(set_to_none=True)
        terms: dict[str, torch.Tensor] = {}
        with autocast():
            logits = model(x)
            if cfg.stage == "self_training":
                parts = region_guided_loss(logits, y, IGNORE_INDEX, cfg.confident_weight, cfg.ignored_weight)
                loss = parts.total
                terms.update(seg=parts.seg, confident_reg=parts.confident, ignored_reg=parts.ignored)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_probs = teacher(batch[0]).float().softmax(1)
                    consistency = consistency_loss(logits, teacher_probs, y)
                    loss = loss + cfg.consistency_weight * consistency
                    terms["consistency"] = consistency
            else:
                loss = cross_entropy(logits, y)
                terms["seg"] = loss
        scaler.scale(loss).backward()
        if cfg.stage == "adversarial":
            discriminator, d_optimizer = extra_modules["discriminator"]
            xt = xt.to(device, non_blocking=True)
            discriminator.requires_grad_(False)
            with autocast():
                target_logits = model(xt)
                adv = adversarial_loss(discriminator(target_logits.float().softmax(1)))
            scaler.scale(cfg.adversarial_weight * adv).backward()
            loss = loss + cfg.adversarial_weight * adv.detach()  # train/loss: the generator's whole objective
            discriminator.requires_grad_(True)
            d_optimizer.zero_grad(set_to_none=True)
            with autocast():
                d_loss = discriminator_loss(
                    discriminator(logits.detach().float().softmax(1)),
                    discriminator(target_logits.detach().float().softmax(1)),
                )
            d_scaler.scale(d_loss).backward()
            distributed.average_gradients(discriminator)
            d_scaler.step(d_optimizer)
            d_scaler.update()
            terms.update(adversarial=adv, discriminator=d_loss)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if teacher is not None:
            ema_update(teacher, distributed.unwrap(model), cfg.teacher_momentum)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        wait, busy = wait + (t1 - t0), busy + (t2 - t1)
        terms["loss"] = loss
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())
        sums["_n"] = sums.get("_n", 0) + 1

        if on_step is not None:
            on_step(step, distributed.unwrap(model))
        is_last = step == cfg.iterations
        metrics = None
        if step % cfg.log_every == 0 or is_last:
            n = sums.pop("_n")
            metrics = {f"train/{k}": v / n for k, v in sums.items()}
            metrics["train/lr"] = optimizer.param_groups[-1]["lr"]
            metrics["train/data_wait_fraction"] = wait / max(1e-9, wait + busy)
            metrics["train/steps_per_s"] = n / max(1e-9, time.perf_counter() - t_log)
            if rank == 0:
                eta = (cfg.iterations - step) / max(1e-9, metrics["train/steps_per_s"])
                print(f"[{cfg.name}] step {step}/{cfg.iterations} loss {metrics['train/loss']:.4f} "
                      f"lr {metrics['train/lr']:.2e} {metrics['train/steps_per_s']:.2f} it/s "
                      f"data wait {100 * metrics['train/data_wait_fraction']:.1f}% eta {eta:.0f}s", flush=True)
            sums, wait, busy, t_log = {}, 0.0, 0.0, time.perf_counter()
        if is_last:
            break  # the final report comes after validation
        if step % cfg.checkpoint_every == 0:
            _save(cfg, step, model, optimizer, scheduler, extra_modules, metrics or {})
        elif metrics is not None:  # every worker reports as often (Ray Train requires it)
            ray.train.report({"step": step, **metrics})

    final_metrics = dict(metrics or {}) if start < cfg.iterations else {}
    if cfg.val is not None:
        cm = evaluate_shard(model, cfg.val.samples(), cfg, device)
        final_metrics.update({f"val/{k}": v for k, v in cm.summary().items()})
        if rank == 0:
            print(f"[{cfg.name}] validation on {cfg.val.dataset} {cfg.val.split}:\n{cm.table()}", flush=True)
    _save(cfg, cfg.iterations, model, optimizer, scheduler, extra_modules, final_metrics)


# -- the driver side ------------------------------------------------------------------------------


@dataclass
class TrainResult:
    checkpoint: str  # URI of the final checkpoint file
    metrics: dict = field(default_factory=dict)


def fit(
    cfg: TrainConfig,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
    callbacks: list[ray.train.UserCallback] = (),
) -> TrainResult:
    """Run (or resume) one training stage on the current Ray cluster. ``callbacks`` see
    every report on the driver side (e.g. pipeline.tracking's MLflow logger)."""
    check_config(cfg)
    fs, root = storage.arrow_filesystem(cfg.storage)
    resources = {"CPU": cfg.cpus_per_worker}
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={"config": config_lib.to_dict(cfg), "on_step": on_step},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=root,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
    )
    result = trainer.fit()
    path = result.checkpoint.path
    uri = path if storage.scheme(cfg.storage) == "file" else f"{storage.scheme(cfg.storage)}://{path}"
    return TrainResult(checkpoint=storage.join(uri, CHECKPOINT_FILE), metrics=dict(result.metrics or {}))
