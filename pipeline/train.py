"""The training loop shared by every method (pipeline.methods), run by Ray Train's
TorchTrainer with DDP, or in a plain Python process without Ray (``fit_local``).

The stages (reference §5) and their methods:

- ``source_only`` / ``oracle``: cross-entropy on the labelled source / target set
  (pipeline.methods.supervised);
- ``adversarial``: output-space adversarial warm-up from a source-only model
  (pipeline.methods.adversarial);
- ``self_training``: one IAST round on a label store; with ``teacher_momentum`` set,
  HIAST's (pipeline.methods.iast);
- ``stvm``: source-free self-training against a mean teacher weighted by a learned
  reliability (pipeline.methods.stvm).

The loop owns device, DDP, mixed precision, the student's optimiser and cosine schedule,
checkpoint and resume, logging and validation; each worker reads its own shard of the
data (pipeline.data.streams), so a resumed run continues the same stream. Checkpoints
(the student, its optimiser, scheduler and step, every module and optimiser the method
declares, the config) are written every ``checkpoint_every`` steps and at the end; a
re-run with the same name resumes from the last one, and Ray Train's FailureConfig
restarts failed workers from it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from pipeline import config as config_lib
from pipeline import distributed, storage
from pipeline.schedule import cosine_factor, group_floor
from pipeline.data.datasets import DataConfig, Sample, load_image, load_label
from pipeline.data.transforms import eval_transform, model_input
from pipeline.evaluation import ConfusionMatrix, predict_probs
from pipeline.label_store import LabelStore
from pipeline.labels import NUM_CLASSES, check_same_space, label_space
from pipeline.methods import Method, StepContext, STvMConfig, method_class, uses_amp
from pipeline.models import (
    build_model,
    load_checkpoint,
    load_imagenet_backbone,
    load_released_checkpoint,
    param_groups,
    save_checkpoint,
    set_batchnorm_mode,
)

CHECKPOINT_FILE = "checkpoint.pt"
PLACEMENT_STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")  # Ray placement groups
Stage = Literal["source_only", "adversarial", "self_training", "oracle", "stvm"]


@dataclass
class TrainConfig:
    stage: Stage
    name: str  # run name: a re-run with the same name and storage resumes
    storage: str  # Ray Train storage path (local folder or s3://)
    iterations: int
    lr: float
    arch: str = "deeplabv2_resnet101"
    num_classes: int = NUM_CLASSES
    label_space: str = "cityscapes19"  # pipeline.labels: its classes, metrics, checkpoints refused from others
    init: str | None = None  # start from this checkpoint (ours, or a released one: init_format)
    init_format: Literal["ours", "iast", "adaptsegnet", "advent"] = "ours"
    imagenet_backbone: str | None = None  # torchvision ResNet weights, when init is None
    batchnorm: Literal["train", "frozen_affine", "frozen"] = "train"
    source: DataConfig | None = None  # labelled (source_only, adversarial)
    target: DataConfig | None = None  # images (adversarial), labelled (oracle)
    label_store: str | None = None  # pseudo-labels (self_training)
    val: DataConfig | None = None  # labelled target val, evaluated at the end
    batch_size: int = 8  # global, split over the workers
    backbone_lr_mult: float = 0.1
    weight_decay: float = 5e-4
    final_lr_ratio: float = 0.001  # the cosine's floor, a fraction of the lr (see lr_floor_of)
    # The cosine's period as a factor of the stage's length: 1 anneals to the floor at the
    # last step; the released rounds use 1.5 (T_MAX 3 epochs for 2-epoch rounds) and end
    # at 0.251x their lr (pipeline.schedule).
    cosine_period: float = 1.0
    lr_floor_of: Literal["group", "head"] = "group"  # released: "head" (eta_min = 0.001 * LR)
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
    stvm: STvMConfig | None = None  # STvM's settings (stage stvm; default STvMConfig())
    adversarial_weight: float = 0.05
    discriminator_lr: float = 2e-5
    discriminator_betas: tuple[float, float] = (0.9, 0.99)  # AdaptSegNet's; released IAST: (0.9, 0.999)
    # "cosine": the discriminator's lr follows the student's schedule (released IAST), with
    # the same period and floor; "constant": it stays at discriminator_lr (AdaptSegNet).
    discriminator_schedule: Literal["constant", "cosine"] = "constant"
    checkpoint_every: int = 500
    # Validate on `val` every this many steps as well as at the end (0: at the end only),
    # and keep the best weights by val/<val_metric> outside the checkpoint rotation
    # (kept_checkpoint(cfg, "best")): the released chain selects checkpoints this way.
    val_every: int = 0
    val_metric: str = "mIoU-19"
    # Steps whose weights are kept outside the rotation (kept_checkpoint(cfg, "step_<N>")):
    # the released chain labels round r+1 with round r's step 2800 and starts it from 6000.
    keep_steps: tuple[int, ...] = ()
    # With several workers, batch norm over all their batches together (torch's
    # SyncBatchNorm; GlooSyncBatchNorm on the CPU), as one GPU at the global batch would.
    sync_batchnorm: bool = True
    log_every: int = 50
    num_workers: int = 1
    # Ray placement of the stage's workers: STRICT_PACK keeps them on one node (NVLink), so
    # DDP never all-reduces the gradients over TCP between nodes; PACK only prefers that.
    placement_strategy: str = "STRICT_PACK"
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
        if self.stage == "stvm" and self.stvm is None:
            self.stvm = STvMConfig()
        if self.stvm is not None and self.stage != "stvm":
            raise ValueError(f"stvm settings apply to stage stvm only, not to {self.stage}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                             f"got {self.placement_strategy!r}")
        if self.cosine_period < 1:
            raise ValueError(f"cosine_period must be >= 1 (a factor of the stage's length; 1 anneals to the "
                             f"floor at the end), got {self.cosine_period}")
        if self.val_every < 0:
            raise ValueError(f"val_every must be >= 0 (0: validate at the end only), got {self.val_every}")
        if self.val_every and self.val is None:
            raise ValueError("val_every is set but the stage has no val data to validate on")
        space = label_space(self.label_space)
        if space.num_classes != self.num_classes:
            raise ValueError(f"num_classes {self.num_classes} differs from label_space {space.name}'s {space.num_classes}")
        if self.val_metric not in (*space.miou, "pixel_accuracy"):
            raise ValueError(f"val_metric must be one of {', '.join((*space.miou, 'pixel_accuracy'))} in label space "
                             f"{space.name}, got {self.val_metric!r}")
        outside = [s for s in self.keep_steps if not 1 <= s <= self.iterations]
        if outside:
            raise ValueError(f"keep_steps {outside} are outside the stage's steps 1..{self.iterations}")
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by num_workers {self.num_workers}"
            )


def check_config(cfg: TrainConfig) -> None:
    """Fail fast, on the driver, before any worker starts: data present, store compatible."""
    storage.check_uri(cfg.storage)
    method = method_class(cfg)
    method.check(cfg)
    for key in ("source", "target", "val"):
        data = getattr(cfg, key)
        if data is None:
            continue
        samples = data.samples()  # raises with the fix when the prepared list is missing
        if not samples:
            raise ValueError(f"{key}: {data.dataset} {data.split} at {data.root} holds no images")
        if (key in method.labelled or key == "val") and samples[0].label is None:
            raise ValueError(f"{key}: {data.dataset} {data.split} at {data.root} has no labels")
    if cfg.label_store:
        manifest = LabelStore(cfg.label_store).manifest()
        check_same_space(f"label store {cfg.label_store}", manifest.get("label_space"), cfg.label_space,
                         "regenerate the labels in this label space or fix label_space")
        if manifest["num_classes"] != cfg.num_classes:
            raise ValueError(
                f"label store {cfg.label_store} has {manifest['num_classes']} classes but the model "
                f"is configured for {cfg.num_classes}; regenerate the labels or fix num_classes"
            )
    for key in ("init", "imagenet_backbone"):
        uri = getattr(cfg, key)
        if uri and not storage.exists(uri):
            raise FileNotFoundError(f"{key}: checkpoint file {uri} not found")


# -- model and optimisation -----------------------------------------------------------------


def _build(cfg: TrainConfig):
    model = build_model(cfg.arch, cfg.num_classes)
    if cfg.init and cfg.init_format != "ours":
        load_released_checkpoint(model, cfg.init, cfg.init_format)
    elif cfg.init:
        load_checkpoint(model, cfg.init, label_space=cfg.label_space)
    elif cfg.imagenet_backbone:
        load_imagenet_backbone(model, cfg.imagenet_backbone)
    set_batchnorm_mode(model, cfg.batchnorm)
    groups = param_groups(model, cfg.lr)
    for group in groups:
        if group["name"] == "backbone":
            group["lr"] = cfg.lr * cfg.backbone_lr_mult
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)

    def cosine(floor: float) -> Callable[[int], float]:
        return lambda step: cosine_factor(step, cfg.iterations, cfg.cosine_period, floor)

    floors = [group_floor(cfg.final_lr_ratio, g["lr"], cfg.lr, cfg.lr_floor_of) for g in groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [cosine(f) for f in floors])
    return model, optimizer, scheduler


# -- where the loop runs ------------------------------------------------------------------


class RaySession:
    """Inside Ray Train's TorchTrainer: its device, DDP wrapper, checkpoints and reports."""

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    @contextmanager
    def latest_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
        else:
            with checkpoint.as_directory() as path:
                yield path

    def report(self, metrics: dict, directory: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=checkpoint)


class LocalSession:
    """A plain Python process (no Ray): checkpoints in ``<storage>/<name>/checkpoint_<step>``
    on the local disk, the last ``keep`` of them kept. Under ``torchrun`` (a process group
    initialised) the model is wrapped in DDP as Ray Train would."""

    def __init__(self, cfg: TrainConfig, keep: int = 2):
        if storage.scheme(cfg.storage) != "file":
            raise ValueError(f"a local run writes to a local folder, not {cfg.storage}: run it with fit() on Ray")
        self.root, self.keep = os.path.join(cfg.storage, cfg.name), keep
        self.use_gpu = cfg.use_gpu
        self.reports: list[dict] = []

    def device(self) -> torch.device:
        if self.use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("use_gpu is set but torch sees no CUDA device")
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        device = self.device()
        model.to(device)
        if distributed.is_distributed():
            ids = [device.index] if device.type == "cuda" else None
            return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    def checkpoints(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        return sorted(os.path.join(self.root, d) for d in os.listdir(self.root) if d.startswith("checkpoint_"))

    @contextmanager
    def latest_checkpoint(self):
        found = self.checkpoints()
        yield found[-1] if found else None

    def report(self, metrics: dict, directory: str | None) -> None:
        self.reports.append(dict(metrics))
        if directory is None:
            return
        final = os.path.join(self.root, f"checkpoint_{metrics['step']:09d}")
        partial = final + ".partial"  # a crash mid-copy leaves no checkpoint that looks whole
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(directory, partial)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old)


def _save(session, cfg, step, student, optimizer, scheduler, modules, scalers, metrics, best):
    """Rank 0 writes the checkpoint; every rank reports (Ray Train needs all of them).
    ``scalers``: name -> GradScaler, saved so that a resumed run keeps its loss scale
    instead of skipping its first steps as overflows from 65,536 down."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = None
        if distributed.rank() == 0:
            extras = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "best": dict(best),
                "config": config_lib.to_dict(cfg),
            }
            for name, (module, opt) in modules.items():
                extras[name] = module.state_dict()
                if opt is not None:
                    extras[f"{name}_optimizer"] = opt.state_dict()
            for name, scaler in scalers.items():
                extras[name] = scaler.state_dict()  # {} when AMP is off
            save_checkpoint(os.path.join(tmp, CHECKPOINT_FILE), student, label_space=cfg.label_space, **extras)
            directory = tmp
        session.report({"step": step, **metrics}, directory)


def _restore(session, student, optimizer, scheduler, modules, scalers) -> tuple[int, dict]:
    """The step to continue after, and the best validation so far ({} when none)."""
    with session.latest_checkpoint() as path:
        if path is None:
            return 0, {}
        state = load_checkpoint(student, os.path.join(path, CHECKPOINT_FILE))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for name, (module, opt) in modules.items():
        module.load_state_dict(state[name])
        if opt is not None:
            opt.load_state_dict(state[f"{name}_optimizer"])
    for name, scaler in scalers.items():
        if state.get(name):  # absent from older checkpoints, empty from runs without AMP
            scaler.load_state_dict(state[name])
    return int(state["step"]), dict(state.get("best", {}))


def kept_checkpoint(cfg: TrainConfig, name: str) -> str:
    """URI of weights kept outside the checkpoint rotation: ``best`` (by val/<val_metric>)
    or ``step_<N>`` (keep_steps). Weights only (a checkpoint of ours), with their step and
    validation metrics."""
    return storage.join(cfg.storage, cfg.name, "kept", f"{name}.pt")


def _keep(cfg: TrainConfig, name: str, student, step: int, metrics: dict) -> None:
    """Rank 0 writes kept weights; never a partial file where a whole one is expected."""
    if distributed.rank() != 0:
        return
    uri = kept_checkpoint(cfg, name)
    values = {k: float(v) for k, v in metrics.items() if k.startswith("val/")}
    if storage.scheme(uri) == "file":
        partial = uri + ".partial"
        save_checkpoint(partial, student, step=step, metrics=values, label_space=cfg.label_space)
        os.replace(partial, uri)
    else:  # an object store commits the object whole when the upload closes
        save_checkpoint(uri, student, step=step, metrics=values, label_space=cfg.label_space)


# -- evaluation -------------------------------------------------------------------------------


def _validate(cfg: TrainConfig, method: Method, samples: list[Sample], device, step: int, final: bool) -> dict:
    cm = evaluate_shard(method.model, samples, cfg, device)
    metrics = {f"val/{k}": v for k, v in cm.summary().items()}
    if distributed.rank() == 0:
        if final:
            print(f"[{cfg.name}] validation on {cfg.val.dataset} {cfg.val.split}:\n{cm.table()}", flush=True)
        else:
            print(f"[{cfg.name}] step {step}: val {cfg.val_metric} {100 * metrics[f'val/{cfg.val_metric}']:.2f}",
                  flush=True)
    return metrics


def _better(metrics: dict, best: dict, key: str) -> bool:
    value = metrics.get(key)
    return value is not None and value == value and (not best or value > best["value"])  # NaN never wins


def evaluate_shard(model, samples: list[Sample], cfg: TrainConfig, device) -> ConfusionMatrix:
    """Every worker evaluates its share of ``samples``; the confusion matrices are summed."""
    cm = ConfusionMatrix(cfg.num_classes, space=cfg.label_space)
    rank, world = distributed.rank(), distributed.world_size()
    net = distributed.unwrap(model)
    distributed.broadcast_buffers(net)  # every shard is evaluated with the saved model's statistics
    normalize = eval_transform()
    for sample in samples[rank::world]:
        label = load_label(sample.label)
        image, _ = normalize(load_image(sample.image), label, None)
        sizes = [tuple(cfg.eval_size)] if cfg.eval_size else None
        # under the stage's mixed precision (fp16 autocast on a GPU with amp; fp32 otherwise)
        probs = predict_probs(net, image[None], sizes=sizes, output_size=label.shape[::-1], autocast=uses_amp(cfg))
        cm.update(probs.argmax(1)[0].cpu().numpy(), label)
    return ConfusionMatrix(cfg.num_classes, distributed.sum_array(cm.matrix, device), cfg.label_space)


# -- the loop ---------------------------------------------------------------------------------


def run_stage(cfg: TrainConfig, session, on_step: Callable[[int, Method], None] | None = None) -> dict:
    """Train (or resume) one stage with its method; returns the final metrics. ``on_step``:
    a callable(step, method) run after every step (``method.student``, and the modules it
    declares; the tests inject faults with it)."""
    torch.manual_seed(cfg.seed)
    device = session.device()
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    rank = distributed.rank()

    student, optimizer, scheduler = _build(cfg)
    synced = cfg.sync_batchnorm and distributed.world_size() > 1
    if synced:  # before the method copies the student (a teacher)
        student = distributed.sync_batchnorm(student, device)
    method: Method = method_class(cfg)(cfg, student, device)
    modules = method.modules()
    method.model = session.prepare(student)
    ctx = StepContext(uses_amp(cfg))
    scalers = {"scaler": ctx.scaler, **method.scalers()}
    start, best = _restore(session, student, optimizer, scheduler, modules, scalers)
    streams = method.streams(start)
    val_samples = cfg.val.samples() if cfg.val is not None else []
    best_key = f"val/{cfg.val_metric}"

    def validate(step: int, final: bool) -> dict:
        nonlocal best
        metrics = _validate(cfg, method, val_samples, device, step, final)
        if cfg.val_every and _better(metrics, best, best_key):
            best = {"step": step, "value": metrics[best_key]}
            _keep(cfg, "best", student, step, metrics)
        return metrics

    if rank == 0:
        print(f"[{cfg.name}] {cfg.stage} ({type(method).__name__}): steps {start}->{cfg.iterations}, "
              f"{distributed.world_size()} worker(s), batch {cfg.batch_size}, batchnorm={cfg.batchnorm}"
              f"{' (synchronised)' if synced else ''}, device={device}", flush=True)
    method.model.train()
    sums: dict[str, float] = {}
    metrics = None
    wait = busy = 0.0
    t_log = time.perf_counter()
    for step in range(start + 1, cfg.iterations + 1):
        t0 = time.perf_counter()
        batch = {name: next(stream) for name, stream in streams.items()}
        t1 = time.perf_counter()
        batch = {name: [model_input(t, device) for t in tensors] for name, tensors in batch.items()}
        optimizer.zero_grad(set_to_none=True)
        ctx.step = step
        terms = method.step(batch, ctx)
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
        scheduler.step()
        method.after_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        wait, busy = wait + (t1 - t0), busy + (t2 - t1)
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())
        sums["_n"] = sums.get("_n", 0) + 1

        if on_step is not None:
            on_step(step, method)
        if step in cfg.keep_steps:
            _keep(cfg, f"step_{step}", student, step, {})
        is_last = step == cfg.iterations
        metrics = None
        if cfg.val_every and step % cfg.val_every == 0 and not is_last:
            metrics = validate(step, final=False)
        if step % cfg.log_every == 0 or is_last:
            n = sums.pop("_n")
            metrics = {**(metrics or {}), **{f"train/{k}": v / n for k, v in sums.items()}}
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
            _save(session, cfg, step, student, optimizer, scheduler, modules, scalers, metrics or {}, best)
        elif metrics is not None:  # every worker reports as often (Ray Train requires it)
            session.report({"step": step, **metrics}, None)

    final_metrics = dict(metrics or {}) if start < cfg.iterations else {}
    if start < cfg.iterations:
        final_metrics.update(method.summary())
    if cfg.val is not None:
        final_metrics.update(validate(cfg.iterations, final=True))
    if best:
        final_metrics.update({"best/step": best["step"], f"best/{best_key}": best["value"]})
    _save(session, cfg, cfg.iterations, student, optimizer, scheduler, modules, scalers, final_metrics, best)
    return final_metrics


def train_loop(loop_config: dict) -> None:
    """Ray Train worker function. ``loop_config``: {"config": TrainConfig dict, and optionally
    "on_step": see run_stage}."""
    cfg = config_lib.from_dict(TrainConfig, loop_config["config"])
    run_stage(cfg, RaySession(), loop_config.get("on_step"))


# -- the driver side ------------------------------------------------------------------------------


@dataclass
class TrainResult:
    checkpoint: str  # URI of the final checkpoint file
    metrics: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)  # "best" / "step_<N>" -> URI (kept_checkpoint)


def _kept(cfg: TrainConfig) -> dict[str, str]:
    names = (["best"] if cfg.val_every else []) + [f"step_{s}" for s in sorted(cfg.keep_steps)]
    uris = {name: kept_checkpoint(cfg, name) for name in names}
    missing = [uri for uri in uris.values() if not storage.exists(uri)]
    if missing:  # a stage resumed from an older run (other keep_steps) cannot make them now
        raise RuntimeError(f"stage {cfg.name} finished without the kept weights {', '.join(missing)}: its "
                           "checkpoints were made with other keep_steps/val_every; delete "
                           f"{storage.join(cfg.storage, cfg.name)} to train it again")
    return uris


def scaling_config(cfg: TrainConfig):
    """The stage's Ray Train workers: one GPU each (use_gpu), cpus_per_worker CPUs, placed
    by placement_strategy (STRICT_PACK: all on one node)."""
    import ray.train

    return ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                   resources_per_worker={"CPU": cfg.cpus_per_worker},
                                   placement_strategy=cfg.placement_strategy)


def fit(
    cfg: TrainConfig,
    on_step: Callable[[int, Method], None] | None = None,
    callbacks: list = (),
) -> TrainResult:
    """Run (or resume) one training stage on the current Ray cluster. ``callbacks`` see
    every report on the driver side (ray.train.UserCallback, e.g. pipeline.tracking's
    MLflow logger)."""
    import ray.train
    import ray.train.torch

    check_config(cfg)
    fs, root = storage.arrow_filesystem(cfg.storage)
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={"config": config_lib.to_dict(cfg), "on_step": on_step},
        scaling_config=scaling_config(cfg),
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
    return TrainResult(checkpoint=storage.join(uri, CHECKPOINT_FILE), metrics=dict(result.metrics or {}),
                       kept=_kept(cfg))


def fit_local(cfg: TrainConfig, on_step: Callable[[int, Method], None] | None = None) -> TrainResult:
    """Run (or resume) one training stage in this process, without Ray (CPU or GPU): for
    tests, GPU checks and single-machine debugging. Checkpoints go to
    ``<storage>/<name>/checkpoint_<step>/``, as a re-run with the same name resumes."""
    check_config(cfg)
    session = LocalSession(cfg)
    metrics = run_stage(cfg, session, on_step)
    return TrainResult(checkpoint=os.path.join(session.checkpoints()[-1], CHECKPOINT_FILE),
                       metrics={"step": cfg.iterations, **metrics}, kept=_kept(cfg))
