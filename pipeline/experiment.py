"""The experiment configuration: one YAML file describes a whole IAST reproduction.

Warm-up (source-only, optionally adversarial) -> self-training rounds 1..R (IAST, CBST,
HIAST), or one source-free STvM stage -> final (multi-scale) evaluation, plus an optional
oracle. This module turns it into the
configurations of the individual stages (pipeline.train.TrainConfig,
pipeline.pseudo_label.PseudoLabelConfig) and says where every output lives.

Layout under ``output`` (a local folder or s3:// prefix)::

    stages/<stage>.json            completion record of a finished stage (checkpoint, metrics)
    train/<stage>/...              Ray Train storage of a training stage (checkpoints)
    labels/round_<r>/...           label store of round r
    init/checkpoint.pt             model.init converted to our format (init_format other than ours)
    config.yaml                    the resolved configuration
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from dataclasses import dataclass, field
from typing import Literal

from pipeline import config as config_lib
from pipeline import storage
from pipeline.data.datasets import DataConfig
from pipeline.labels import LabelSpace, check_same_space, label_space
from pipeline.methods import STvMConfig
from pipeline.pseudo_label import PseudoLabelConfig, SelectorConfig
from pipeline.train import PLACEMENT_STRATEGIES, TrainConfig


# Which checkpoint of a finished stage the next link of the chain takes: its last weights,
# its best on val (the stage validates every val_every steps), or the weights of a step
# (kept for it outside the checkpoint rotation).
CheckpointChoice = Literal["last", "best"] | int


@dataclass
class ModelConfig:
    arch: str = "deeplabv2_resnet101"
    imagenet_backbone: str | None = None  # torchvision resnet101-*.pth, for source-only from scratch
    init: str | None = None  # start the warm-up (or round 1) from this checkpoint instead
    init_format: Literal["ours", "iast", "adaptsegnet", "advent"] = "ours"  # the layout of its file
    # Label round 1 with these weights instead of model.init (same format), when no warm-up
    # stage runs: the released warm-up ships two files, G (best on val) labels and M (last)
    # starts round 1.
    generator_init: str | None = None
    # The released protocol trains an ImageNet backbone at 0.1x the head's lr; a backbone
    # trained from scratch (the benchmark's small model) needs the full lr.
    backbone_lr_mult: float = 0.1

    def __post_init__(self):
        if self.backbone_lr_mult <= 0:
            raise ValueError(f"model.backbone_lr_mult must be > 0, got {self.backbone_lr_mult}")
        storage.check_fields(self, "imagenet_backbone", "init", "generator_init")
        if self.generator_init and not self.init:
            raise ValueError("model.generator_init labels round 1 beside model.init's weights: set model.init too")
        self.imagenet_backbone = storage.absolute(self.imagenet_backbone)
        self.init = storage.absolute(self.init)
        self.generator_init = storage.absolute(self.generator_init)


@dataclass(kw_only=True)
class DataSection:
    target: DataConfig  # unlabelled target train split
    val: DataConfig  # labelled target val split
    # Labelled source frames; not needed by a source-free experiment (stvm) that starts
    # from model.init.
    source: DataConfig | None = None
    # Labelled source frames the source model never trains on: its accuracy there tells a
    # model that fits its own domain from one that has not learnt it (the built-in
    # benchmark's precondition P1). Optional; evaluated after source-only.
    source_val: DataConfig | None = None


@dataclass
class ComputeConfig:
    """How the work is spread over the Ray cluster."""

    num_workers: int = 1  # training workers (DDP)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    loader_workers: int = 2  # DataLoader processes per training worker
    decoded_cache_mb: float = 0  # decoded samples kept in memory, per loader process (0: none)
    amp: bool = True
    # With num_workers > 1, batch norm over every worker's batch together (SyncBatchNorm),
    # as the released code does on several GPUs; off, each worker normalises its own share.
    sync_batchnorm: bool = True
    # Where Ray places a stage's training workers: STRICT_PACK, all on one node, so that DDP
    # all-reduces over NVLink, not TCP between nodes (a stage needing more GPUs than a node
    # has then waits for one; PACK only prefers one node, SPREAD spreads them).
    placement_strategy: str = "STRICT_PACK"
    # fp16 autocast in pseudo-labelling and the final evaluation on GPUs (no effect on the CPU)
    inference_amp: bool = True
    label_workers: int = 1  # pseudo-labelling actors, one model each
    gpus_per_label_worker: float = 0.0
    cpus_per_label_worker: float = 1.0
    eval_workers: int = 1  # final evaluation tasks
    # Memory of one GPU in GiB, as torch reports it (V100-16GB: 15.78, V100-32GB: 31.75):
    # set, every training stage's per-GPU batch is checked against it before anything
    # starts (pipeline.memory's estimate); None: not checked.
    gpu_memory_gb: float | None = None

    def __post_init__(self):
        config_lib.require(self, "positive", "num_workers", "cpus_per_worker", "label_workers", "cpus_per_label_worker",
                           "eval_workers", "gpu_memory_gb")
        config_lib.require(self, "non_negative", "loader_workers", "decoded_cache_mb", "gpus_per_label_worker")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                             f"got {self.placement_strategy!r}")


@dataclass
class StageSchedule:
    """What every training stage's section sets, declared once: its length (0 skips it),
    batch, batch norm, checkpoints, the lr cosine's period over its length, and periodic
    validation (every val_every steps as well as at the end, the best kept)."""

    iterations: int = 0
    batch_size: int = 8
    batchnorm: Literal["train", "frozen_affine", "frozen"] = "train"
    checkpoint_every: int = 1000
    # The released rounds use 1.5 (T_MAX 3 epochs for 2-epoch rounds): a round ends at
    # 0.251x its lr, not at the floor.
    cosine_period: float = 1.0
    val_every: int = 0  # 0: validate at the end only
    val_size: tuple[int, int] | None = None  # (width, height) of validation; None: eval_size

    def __post_init__(self):
        config_lib.require(self, "non_negative", "iterations", "val_every")
        config_lib.require(self, "positive", "batch_size", "checkpoint_every", "val_size")


@dataclass
class StageConfig(StageSchedule):
    """A warm-up or oracle training stage."""

    lr: float = 1e-4
    adversarial_weight: float = 0.05  # adversarial stage only
    discriminator_lr: float = 2e-5
    discriminator_betas: tuple[float, float] = (0.9, 0.99)  # released IAST: (0.9, 0.999)
    discriminator_schedule: Literal["constant", "cosine"] = "constant"  # released IAST: cosine

    def __post_init__(self):
        super().__post_init__()
        config_lib.require(self, "non_negative", "adversarial_weight")
        config_lib.require(self, "positive", "lr", "discriminator_lr")
        config_lib.require(self, "fraction", "discriminator_betas")


@dataclass
class RoundConfig:
    alpha: float  # IAS selection proportion of this round
    lr: float
    pseudo_label_size: tuple[int, int]  # (width, height)

    def __post_init__(self):
        config_lib.require(self, "fraction", "alpha")
        config_lib.require(self, "positive", "lr", "pseudo_label_size")


@dataclass
class ConsistencyConfig:
    """HIAST's teacher-student consistency (reference §4): the student trains on strong
    views (3 of 8 colour operations on the weak view); an EMA teacher, a fresh copy of the
    round's initial weights, predicts on the weak views, and its soft predictions supervise
    the student on the pixels without a pseudo-label (L_cst)."""

    weight: float = 0.5
    teacher_momentum: float = 0.999  # per step

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if not 0 <= self.teacher_momentum < 1:
            raise ValueError(f"teacher_momentum must be in [0, 1), got {self.teacher_momentum}")


@dataclass
class SelfTrainingConfig(StageSchedule):
    """The rounds: their schedule (StageSchedule, per round) and what each round sets."""

    rounds: list[RoundConfig] = field(default_factory=list)  # empty: no rounds (an stvm experiment)
    selector: Literal["ias", "cbst", "constant"] = "ias"
    beta: float = 0.9
    gamma: float = 8.0
    instance_size: int = 1
    cbst_portion: float = 0.2
    constant_threshold: float = 0.9
    # "ground_truth": the selected pixels take their true class, an upper bound;
    # "correct_only": the wrongly labelled ones are dropped. Diagnostics only, they need the
    # target's labels (see pipeline.pseudo_label.SelectorConfig).
    label_values: Literal["prediction", "ground_truth", "correct_only"] = "prediction"
    confident_weight: float = 0.1
    ignored_weight: float = 3.0
    consistency: ConsistencyConfig | None = None  # set: HIAST's training; null: IAST's
    # HIAST's hard-aware augmentation: paste the pseudo-labelled pixels of this many
    # hardest classes from a donor image into every sample (HIAST: 14); 0: off.
    hard_classes: int = 0
    # Round r's weights come from round r-1's final checkpoint (round 1: the warm-up). The
    # released code labels round r+1 with an earlier checkpoint of round r; here both
    # choices are explicit and logged.
    init_from: Literal["previous_round", "warmup"] = "previous_round"
    generator_from: Literal["previous_round", "warmup"] = "previous_round"
    label_test_sizes: tuple[tuple[int, int], ...] = ()  # multi-scale pseudo-labelling; () = single
    label_flip: bool = False
    # The order IAS visits the target images in (its thresholds are a running state):
    # "sorted" by name, or "released_permutation", the released loader's seeded shuffle.
    label_order: Literal["sorted", "released_permutation"] = "sorted"
    label_resize: Literal["bilinear", "lanczos"] = "bilinear"  # of the labelling input; released: lanczos
    # The backbone's lr over the head's in the rounds (None: model.backbone_lr_mult). The
    # released rounds train a pretrained backbone at 0.1x; a benchmark model trained from
    # scratch needs 1.0 in source-only and can keep 0.1 here.
    backbone_lr_mult: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.backbone_lr_mult is not None and self.backbone_lr_mult <= 0:
            raise ValueError(f"self_training.backbone_lr_mult must be > 0 (or null), got {self.backbone_lr_mult}")
        config_lib.require(self, "non_negative", "gamma", "confident_weight", "ignored_weight", "hard_classes")
        config_lib.require(self, "positive", "instance_size")
        config_lib.require(self, "probability", "beta", "constant_threshold")
        config_lib.require(self, "fraction", "cbst_portion")


@dataclass
class STvMStageConfig(STvMConfig, StageSchedule):
    """Source-free adaptation after the warm-up, in place of the rounds (reference §10;
    docs/methods.md): the STvM settings (pipeline.methods.stvm.STvMConfig) and the stage's
    schedule (StageSchedule; iterations 0: no STvM stage). It reads the warm-up's weights
    and the target images only."""

    lr: float = 1e-4
    backbone_lr_mult: float | None = None  # None: model.backbone_lr_mult

    def __post_init__(self):
        STvMConfig.__post_init__(self)
        StageSchedule.__post_init__(self)

    def settings(self) -> STvMConfig:
        return STvMConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(STvMConfig)})


@dataclass
class ChainConfig:
    """Which checkpoint of the stage before each link of the chain takes (a
    CheckpointChoice: "last", "best" on val, or a step), and which one the final
    evaluation reports. Every choice is recorded in the next stage's lineage."""

    adversarial_init: CheckpointChoice = "last"  # source-only's, starting the adversarial warm-up
    round1_generator: CheckpointChoice = "last"  # the warm-up's, labelling round 1
    round1_init: CheckpointChoice = "last"  # the warm-up's, starting round 1
    generator: CheckpointChoice = "last"  # round r's, labelling round r+1
    init: CheckpointChoice = "last"  # round r's, starting round r+1
    # The final evaluation's headline: the adaptation's last weights, or the best on val
    # over all its rounds (the released figure; it selects on the target val set). With
    # periodic validation both are evaluated and reported.
    report: Literal["last", "best"] = "last"

    def __post_init__(self):
        for key in ("adversarial_init", "round1_generator", "round1_init", "generator", "init"):
            value = getattr(self, key)
            if isinstance(value, int) and value < 1:
                raise ValueError(f"chain.{key} must be last, best or a step >= 1, got {value}")


@dataclass
class EvalConfig:
    sizes: tuple[tuple[int, int], ...] = ()  # final multi-scale evaluation; () = label size
    flip: bool = False
    # Also evaluate with flip, reported apart (final_eval's flip/val/...): the released
    # protocol reports without, and flip adds a few tenths.
    report_flip: bool = False


@dataclass
class ExperimentConfig:
    name: str
    output: str
    data: DataSection
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
    stvm: STvMStageConfig = field(default_factory=STvMStageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    source_only: StageConfig = field(default_factory=StageConfig)
    adversarial: StageConfig = field(default_factory=StageConfig)
    oracle: StageConfig = field(default_factory=StageConfig)
    final_eval: EvalConfig = field(default_factory=EvalConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    # A name for the protocol the config follows ("released", "clean", ...): tagged on the
    # MLflow runs and printed with the final table, so that figures are compared alike.
    protocol: str = "custom"
    tracking_uri: str | None = None  # default: sqlite under output (local output only)
    # The classes the model predicts and the metrics reported (pipeline.labels): cityscapes19
    # (GTA5/SYNTHIA -> Cityscapes), nthu13 (Cityscapes -> NTHU Cross-City), robotcar9.
    label_space: str = "cityscapes19"
    num_classes: int | None = None  # the label space's; giving another is an error
    crop_size: tuple[int, int] = (1024, 512)  # (width, height)
    source_crop_heights: tuple[int, int] = (341, 950)
    target_crop_heights: tuple[int, int] = (341, 1000)
    eval_size: tuple[int, int] | None = None  # validation size after each stage; None: label size
    val_metric: str | None = None  # what "best on val" means; default the space's headline (SYNTHIA: mIoU-16)
    # The lr cosine's floor (final_lr_ratio 0.001) as a fraction of each parameter group's
    # own lr ("group") or of the head's lr for all ("head", the released eta_min).
    lr_floor_of: Literal["group", "head"] = "group"
    seed: int = 888

    def __post_init__(self):
        try:
            self.output = storage.absolute(storage.check_uri(self.output))
        except ValueError as err:
            raise ValueError(f"output: {err}") from None
        try:
            space = label_space(self.label_space)
        except ValueError as err:
            raise ValueError(f"label_space: {err}") from None
        if self.num_classes not in (None, space.num_classes):
            raise ValueError(f"num_classes is {self.num_classes}, but label_space {space.name} has "
                             f"{space.num_classes} classes: remove num_classes, or choose the label_space")
        self.num_classes = space.num_classes
        if self.val_metric is None:  # an empty string is a mistake, not "the default"
            self.val_metric = space.headline
        if self.val_metric not in (*space.miou, "pixel_accuracy"):
            raise ValueError(f"val_metric {self.val_metric!r} is not reported in label space {space.name}: use "
                             f"one of {', '.join((*space.miou, 'pixel_accuracy'))}")
        if self.stvm.iterations > 0 and self.self_training.rounds:
            raise ValueError("self_training.rounds and stvm.iterations are both set: an experiment adapts "
                             "either with rounds of pseudo-labels or with source-free STvM; give one")
        if self.stvm.iterations == 0 and not self.self_training.rounds:
            raise ValueError("no adaptation configured: give self_training.rounds (IAST, CBST, HIAST), or "
                             "stvm.iterations (source-free STvM)")
        if self.data.source is None and (self.source_only.iterations or self.adversarial.iterations):
            raise ValueError("data.source is empty, but source_only or adversarial is set to train on it: give "
                             "data.source, or start from model.init with source_only.iterations 0")

    def tracked(self) -> dict:
        """The configuration as the experiment's MLflow parent run logs it: without the
        adaptation it does not run (an IAST experiment's stvm section, an STvM experiment's
        self_training), so that changing an unused section does not change the run."""
        data = config_lib.to_dict(self)
        data.pop("self_training" if self.source_free else "stvm")
        return data

    @property
    def space(self) -> LabelSpace:
        return label_space(self.label_space)

    @property
    def source_free(self) -> bool:
        return self.stvm.iterations > 0

    @property
    def adaptation_stage(self) -> str:
        """The stage whose model the final evaluation reports: the last round, or stvm."""
        return "stvm" if self.source_free else f"round_{len(self.self_training.rounds)}"

    def check(self, cluster: list | None = None) -> None:
        """Fail in seconds, not hours, and before anything is created: raises ConfigError
        listing every problem (see ``problems``)."""
        found = self.problems(cluster)
        if found:
            head = "1 problem" if len(found) == 1 else f"{len(found)} problems"
            raise config_lib.ConfigError(f"{head} before any work started:\n" + "\n".join(f"  - {p}" for p in found))

    def problems(self, cluster: list | None = None) -> list[str]:
        """Everything that can be known wrong before the experiment starts, each naming the
        key or file and the fix: every stage's settings, storage URIs, an output that
        cannot be written, every dataset prepared (lists, labels) and every weights file
        present and fitting the model (architecture and number of classes).

        With ``cluster`` (pipeline.cluster.node_shapes(): the dry run, ``--check``), also
        what only the running cluster and services tell: every stage's resources placed
        on its nodes, the MLflow server answering, an s3:// output writable (a probe
        object, written and removed)."""
        found = []

        def attempt(check, *args) -> None:
            try:
                check(*args)
            except (ValueError, OSError, config_lib.ConfigError) as err:
                found.append(str(err))

        attempt(self.check_stages)
        attempt(self.check_chain)
        for key in ("source", "target", "val", "source_val"):
            if getattr(self.data, key) is not None:  # source (source-free) and source_val are optional
                attempt(self._check_data, key)
        for key in ("imagenet_backbone", "init", "generator_init"):
            if getattr(self.model, key):
                attempt(self._check_weights, key)
        attempt(self._check_output)
        attempt(self._check_tracking)
        if cluster is not None:
            from pipeline import cluster as cluster_lib

            found += cluster_lib.problems(self, cluster)
            attempt(self._check_output_writable)
            attempt(self._check_tracking_server)
        if self.compute.use_gpu and self.compute.gpu_memory_gb is not None:
            for stage, build in self._training_stages():
                attempt(self._check_memory, stage, build)
        return found

    def _training_stages(self) -> list:
        """(stage, a function building its TrainConfig) for every training stage that runs
        (one round stands for all: the rounds share their batch and workers)."""
        stages = [(s, lambda s=s: self.warmup_config(s, None)) for s in ("source_only", "adversarial", "oracle")
                  if getattr(self, s).iterations > 0]
        if self.self_training.rounds:
            stages.append(("self_training", lambda: self.round_train_config(1, None)))
        if self.source_free:
            stages.append(("stvm", lambda: self.stvm_train_config(None)))
        return stages

    def _check_memory(self, stage: str, build) -> None:
        from pipeline import memory

        try:
            cfg = build()
        except ValueError:
            return  # reported by check_stages
        memory.check_fits(stage, cfg, self.compute.gpu_memory_gb)

    def _check_data(self, key: str) -> None:
        data = getattr(self.data, key)
        samples = data.samples()  # raises with the prepare command when the list is missing
        if not samples:
            raise ValueError(f"data.{key}: {data.dataset} {data.split} at {data.root} holds no images")
        if key != "target" and samples[0].label is None:
            raise ValueError(f"data.{key}: {data.dataset} {data.split} at {data.root} has no labels")
        if samples[0].label is not None:
            check_same_space(f"data.{key}'s labels ({data.stats_uri()})", data.label_space(), self.space,
                             f"prepare them with `python jobs/prepare_data.py --dataset {data.dataset} --root "
                             f"{data.root} --label-space {self.label_space}` and point data.{key}.prepared "
                             "at its output")

    def _check_weights(self, key: str) -> None:
        from pipeline.models import build_model, load_checkpoint, load_imagenet_backbone, load_released_checkpoint

        uri = getattr(self.model, key)
        try:
            if not storage.exists(uri):
                raise FileNotFoundError(f"weights file {uri} not found (weights are never downloaded: put it there)")
            model = build_model(self.model.arch, self.num_classes)
            if key == "imagenet_backbone":
                load_imagenet_backbone(model, uri)
            elif self.model.init_format != "ours":
                load_released_checkpoint(model, uri, self.model.init_format)
            else:
                load_checkpoint(model, uri, label_space=self.label_space)
        except (ValueError, OSError, RuntimeError) as err:
            raise ValueError(f"model.{key}: {err} (model.arch {self.model.arch}, label_space {self.label_space}, "
                             f"num_classes {self.num_classes})") from None

    def _check_output(self) -> None:
        if storage.scheme(self.output) != "file":
            return  # object storage: its permissions show at the first write
        existing = self.output
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise ValueError(f"output: {existing} is a file, not a folder: choose another output=...")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"output: {self.output} cannot be written ({existing} is not writable): choose "
                             "another output=...")

    def _check_tracking(self) -> None:
        if self.tracking_uri is None and storage.scheme(self.output) != "file":
            raise ValueError("tracking_uri: set it (an MLflow server, e.g. http://mlflow:5000, or "
                             "sqlite:///local/path.db) when output is not a local folder")

    def _check_output_writable(self) -> None:
        if storage.scheme(self.output) == "file":
            return  # _check_output
        probe = storage.join(self.output, f".write-check-{uuid.uuid4().hex}")
        try:
            storage.write_bytes(probe, b"")
            fs, path = storage.filesystem(probe)
            fs.rm(path)
        except OSError as err:
            raise ValueError(f"output: {self.output} cannot be written ({err}): check the bucket, the "
                             "nodes' credentials and AWS_ENDPOINT_URL") from None

    def _check_tracking_server(self) -> None:
        import urllib.request

        from pipeline.tracking import scrub_uri

        if not (self.tracking_uri or "").startswith(("http://", "https://")):
            return  # a local store: _check_output covers its folder
        try:  # MLflow's server answers /health without creating anything
            urllib.request.urlopen(self.tracking_uri.rstrip("/") + "/health", timeout=10).close()
        except OSError as err:
            raise ValueError(f"tracking_uri: the MLflow server {scrub_uri(self.tracking_uri)} does not answer "
                             f"({scrub_uri(str(err))})") from None

    def check_stages(self) -> None:
        """Builds the configuration of every stage that will run, so that a setting one of
        them rejects (e.g. a batch size the workers do not divide) fails now, not after
        the stages before it have trained. Static only: the checkpoints and label stores
        the stages start from do not exist yet (pipeline.train.check_config checks them
        when each stage starts)."""
        if self.source_only.iterations == 0 and self.model.init is None:
            raise ValueError("no warm-up to start from: set source_only.iterations, or model.init to a "
                             "warm-up checkpoint")

        def build(stage: str, make, *args) -> None:
            try:
                make(*args)
            except ValueError as err:
                raise ValueError(f"{stage}: {err}") from err

        for stage in ("source_only", "adversarial", "oracle"):
            if getattr(self, stage).iterations > 0:
                build(stage, self.warmup_config, stage, None)
        for r in range(1, len(self.self_training.rounds) + 1):
            build(f"round_{r}", self.round_label_config, r, None)
            build(f"round_{r}", self.round_train_config, r, None)
        if self.source_free:
            build("stvm", self.stvm_train_config, None)

    # -- where things live ------------------------------------------------------------
    def stage_record(self, stage: str) -> str:
        return storage.join(self.output, "stages", f"{stage}.json")

    def finished_stages(self) -> list[str]:
        """The stages with a completion record under ``output`` (any of this config's)."""
        stages = ["init", "source_only", "adversarial", "stvm", "final_eval", "oracle"]
        stages += [f"round_{r}" for r in range(1, len(self.self_training.rounds) + 1)]
        return [stage for stage in stages if storage.exists(self.stage_record(stage))]

    def label_store(self, round_index: int) -> str:
        return storage.join(self.output, "labels", f"round_{round_index}")

    @property
    def train_storage(self) -> str:
        return storage.join(self.output, "train")

    @property
    def init_checkpoint(self) -> str:
        return storage.join(self.output, "init", "checkpoint.pt")

    # -- stage configurations -------------------------------------------------------------
    def _train(self, stage: str, name: str, section: StageSchedule, lr: float, **kw) -> TrainConfig:
        """A stage's TrainConfig from its config ``section`` (schedule, batch, validation)
        and the experiment-wide settings."""
        c = self.compute
        return TrainConfig(
            stage=stage, name=name, storage=self.train_storage, iterations=section.iterations, lr=lr,
            arch=self.model.arch, num_classes=self.num_classes, label_space=self.label_space,
            batch_size=section.batch_size,
            batchnorm=section.batchnorm,
            backbone_lr_mult=kw.pop("backbone_lr_mult", None) or self.model.backbone_lr_mult,
            crop_size=self.crop_size, source_crop_heights=self.source_crop_heights,
            target_crop_heights=self.target_crop_heights, checkpoint_every=section.checkpoint_every,
            cosine_period=section.cosine_period, lr_floor_of=self.lr_floor_of, val_every=section.val_every,
            val_metric=self.val_metric, eval_size=section.val_size or self.eval_size,
            keep_steps=self._kept_steps(name), sync_batchnorm=c.sync_batchnorm,
            placement_strategy=c.placement_strategy,
            num_workers=c.num_workers, use_gpu=c.use_gpu, cpus_per_worker=c.cpus_per_worker,
            loader_workers=c.loader_workers, decoded_cache_mb=c.decoded_cache_mb, amp=c.amp, seed=self.seed,
            val=self.data.val, **kw,
        )

    # -- the chain: which checkpoint each link takes ------------------------------------------
    def chain_links(self) -> list[tuple[str, str, CheckpointChoice]]:
        """(link, the stage it reads, its choice) of every link that will run: the chain's
        settings resolved against the stages configured."""
        ch, links = self.chain, []
        if self.adversarial.iterations and self.source_only.iterations:
            links.append(("adversarial_init", "source_only", ch.adversarial_init))
        for r in range(1, len(self.self_training.rounds) + 1):
            for role in ("generator", "init"):
                links.append((f"round_{r} {role}", *self.round_link(r, role)))
        return links

    def round_link(self, round_index: int, role: Literal["generator", "init"]) -> tuple[str, CheckpointChoice]:
        """(the stage, its chain choice) that round ``round_index``'s generator (labels) or
        init (weights) come from: the warm-up for round 1 or with self_training.<role>_from
        warmup (chain.round1_<role>), else the round before (chain.<role>)."""
        if round_index == 1 or getattr(self.self_training, f"{role}_from") == "warmup":
            return self.warmup_stage, getattr(self.chain, f"round1_{role}")
        return f"round_{round_index - 1}", getattr(self.chain, role)

    @property
    def warmup_stage(self) -> str:
        """The stage the adaptation starts from: adversarial, source_only, or "warmup" (model.init)."""
        for stage in ("adversarial", "source_only"):
            if getattr(self, stage).iterations > 0:
                return stage
        return "warmup"

    def _kept_steps(self, stage: str) -> tuple[int, ...]:
        """The steps of ``stage`` a later link takes, kept outside the checkpoint rotation."""
        return tuple(sorted({choice for _, source, choice in self.chain_links()
                             if source == stage and isinstance(choice, int)}))

    def check_chain(self) -> None:
        """Every link's choice exists: "best" needs that stage's val_every, a step its range;
        a given warm-up (model.init) has only its last weights."""
        for link, source, choice in self.chain_links():
            if choice == "last":
                continue
            where = f"chain ({link} takes {choice!r} of {source})"
            if source == "warmup":
                raise ValueError(f"{where}: the warm-up is model.init, a single file; give its choice as last "
                                 "(and model.generator_init for other labelling weights)")
            section = self.self_training if source.startswith("round_") else getattr(self, source)
            if choice == "best" and not section.val_every:
                key = "self_training" if source.startswith("round_") else source
                raise ValueError(f"{where}: {source} keeps no best checkpoint; set {key}.val_every")
            if isinstance(choice, int) and choice > section.iterations:
                raise ValueError(f"{where}: {source} runs {section.iterations} steps only")
        if self.chain.report == "best" and not (self.stvm if self.source_free else self.self_training).val_every:
            key = "stvm" if self.source_free else "self_training"
            raise ValueError(f"chain.report is best, but the adaptation keeps no best checkpoint: set {key}.val_every")

    def warmup_config(self, stage: Literal["source_only", "adversarial", "oracle"], init: str | None) -> TrainConfig:
        s: StageConfig = getattr(self, stage)
        if init:
            weights = {"init": init, "init_format": "ours"}
        elif stage == "oracle":  # an upper bound trained on target labels: never from a warm-up checkpoint
            weights = {"imagenet_backbone": self.model.imagenet_backbone}
        else:
            weights = {"init": self.model.init, "init_format": self.model.init_format,
                       "imagenet_backbone": self.model.imagenet_backbone}
        return self._train(
            stage, stage, s, s.lr,
            source=self.data.source if stage != "oracle" else None,
            target=self.data.target if stage != "source_only" else None,
            adversarial_weight=s.adversarial_weight, discriminator_lr=s.discriminator_lr,
            discriminator_betas=s.discriminator_betas, discriminator_schedule=s.discriminator_schedule, **weights,
        )

    def round_train_config(self, round_index: int, init: str) -> TrainConfig:
        st, r = self.self_training, self.self_training.rounds[round_index - 1]
        c = st.consistency
        hiast = {"teacher_momentum": c.teacher_momentum, "consistency_weight": c.weight} if c else {}
        if st.hard_classes:
            hiast["hard_classes"] = st.hard_classes
        return self._train(
            "self_training", f"round_{round_index}", st, r.lr, init=init, label_store=self.label_store(round_index),
            confident_weight=st.confident_weight, ignored_weight=st.ignored_weight,
            backbone_lr_mult=st.backbone_lr_mult, **hiast,
        )

    def stvm_train_config(self, init: str) -> TrainConfig:
        s = self.stvm
        return self._train(
            "stvm", "stvm", s, s.lr, init=init, target=self.data.target, backbone_lr_mult=s.backbone_lr_mult,
            stvm=s.settings(),
        )

    def round_label_config(self, round_index: int, generator: str) -> PseudoLabelConfig:
        st, r = self.self_training, self.self_training.rounds[round_index - 1]
        c = self.compute
        return PseudoLabelConfig(
            target=self.data.target, store=self.label_store(round_index), checkpoint=generator,
            arch=self.model.arch, num_classes=self.num_classes, label_space=self.label_space,
            size=r.pseudo_label_size,
            test_sizes=st.label_test_sizes, flip=st.label_flip, order=st.label_order, resize=st.label_resize,
            selector=SelectorConfig(
                name=st.selector, alpha=r.alpha, beta=st.beta, gamma=st.gamma, instance_size=st.instance_size,
                portion=st.cbst_portion, threshold=st.constant_threshold, label_values=st.label_values,
            ),
            num_workers=c.label_workers, gpus_per_worker=c.gpus_per_label_worker, amp=c.inference_amp,
            cpus_per_worker=c.cpus_per_label_worker, round=round_index,
        )
