import hashlib
import os
import time

import numpy as np
import pytest
import ray.train
import torch

from pipeline import config
from pipeline.label_store import LabelStore
from pipeline.pseudo_label import PseudoLabelConfig, SelectorConfig
from pipeline.pseudo_label import run as make_labels
from pipeline.methods.teacher import ema_update
from pipeline.train import TrainConfig, check_config, fit


def _cfg(tmp_path, benchmark_data, **kw):
    base = dict(
        stage="source_only", name="run", storage=str(tmp_path / "runs"), iterations=5, lr=1e-3,
        arch="deeplabv2_small", source=benchmark_data["source"], batch_size=2, crop_size=(64, 32),
        source_crop_heights=(48, 96), target_crop_heights=(48, 96), checkpoint_every=2, log_every=1,
        loader_workers=0, num_workers=1, cpus_per_worker=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def _record(folder):
    """A per-step hook: each worker appends (step, parameter digest) to its own file."""
    def hook(step, method):
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in method.student.parameters())).hexdigest()
        rank = ray.train.get_context().get_world_rank()
        with open(os.path.join(folder, f"rank{rank}.log"), "a") as f:
            f.write(f"{step} {digest}\n")
    return hook


def _log(folder, rank):
    with open(os.path.join(folder, f"rank{rank}.log")) as f:
        return [tuple(line.split()) for line in f]


def test_ddp_replicas_stay_identical_and_a_killed_worker_resumes(ray_cluster, benchmark_data, tmp_path):
    folder = str(tmp_path)
    marker = tmp_path / "killed"
    record = _record(folder)

    def hook(step, model):
        record(step, model)
        if step == 3 and ray.train.get_context().get_world_rank() == 1 and not marker.exists():
            marker.touch()
            time.sleep(3)  # Ray Train registers the step-2 checkpoint asynchronously
            os._exit(1)  # the worker process dies mid-run

    cfg = _cfg(tmp_path, benchmark_data, num_workers=2, val=benchmark_data["val"])
    result = fit(cfg, on_step=hook)
    assert marker.exists()
    assert result.metrics["step"] == 5
    rank0, rank1 = _log(folder, 0), _log(folder, 1)
    # steps 1-3 ran, the group restarted from the step-2 checkpoint, then 3-5 ran again
    assert [int(s) for s, _ in rank0] == [1, 2, 3, 3, 4, 5]
    assert rank0 == rank1  # same weights on both replicas after every step
    assert "val/mIoU-19" in result.metrics and 0 <= result.metrics["val/mIoU-19"] <= 1
    state = torch.load(result.checkpoint, weights_only=True)
    assert state["step"] == 5 and state["config"]["stage"] == "source_only"
    assert {"model", "optimizer", "scheduler"} <= set(state)


def test_a_second_invocation_with_the_same_name_resumes(ray_cluster, benchmark_data, tmp_path):
    folder = str(tmp_path)
    record = _record(folder)

    def crash(step, model):
        record(step, model)
        if step == 3:
            raise RuntimeError("simulated crash")

    cfg = _cfg(tmp_path, benchmark_data, max_failures=0)
    with pytest.raises(Exception, match="simulated crash"):
        fit(cfg, on_step=crash)
    result = fit(cfg, on_step=record)
    steps = [int(s) for s, _ in _log(folder, 0)]
    assert steps == [1, 2, 3, 3, 4, 5]  # resumed after the step-2 checkpoint
    assert result.metrics["step"] == 5


def test_bad_configs_fail_before_training(benchmark_data, tmp_path):
    with pytest.raises(config.ConfigError, match="unknown config key.*learning_rate"):
        config.from_dict(TrainConfig, {**config.to_dict(_cfg(tmp_path, benchmark_data)), "learning_rate": 1})
    missing = _cfg(tmp_path, benchmark_data, source=benchmark_data["source"].__class__("gta5", str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        check_config(missing)
    store = LabelStore(str(tmp_path / "labels"))
    store.commit({"num_classes": 16, "num_parts": 0})
    wrong = _cfg(tmp_path, benchmark_data, stage="self_training", label_store=store.uri)
    with pytest.raises(ValueError, match="16 classes"):
        check_config(wrong)
    store.invalidate()
    store.commit({"num_classes": 19, "num_parts": 0, "statistics": {"coverage_all": 0.5}})  # an older store
    old = _cfg(tmp_path, benchmark_data, stage="self_training", label_store=store.uri, hard_classes=14)
    with pytest.raises(ValueError, match="no per-class confidence.*regenerate"):
        check_config(old)
    with pytest.raises(ValueError, match="needs `target`"):
        check_config(_cfg(tmp_path, benchmark_data, stage="oracle"))


def test_ema_update_moves_weights_and_batchnorm_statistics():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    student(torch.randn(2, 3, 5, 5))  # moves the student's running statistics and counter
    with torch.no_grad():
        student[1].weight.mul_(2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.9)
    after, taught = teacher.state_dict(), student.state_dict()
    for key in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
        torch.testing.assert_close(after[key], 0.9 * before[key] + 0.1 * taught[key])
        assert not torch.equal(after[key], taught[key])
    assert after["1.num_batches_tracked"] == taught["1.num_batches_tracked"] == 1


def _cbst_store(tmp_path, benchmark_data, checkpoint) -> str:
    """A label store from CBST, which keeps pixels of even a barely trained generator."""
    store = str(tmp_path / "labels")
    make_labels(PseudoLabelConfig(target=benchmark_data["target"], store=store, checkpoint=checkpoint,
                                  arch="deeplabv2_small", size=(128, 64),
                                  selector=SelectorConfig("cbst", portion=0.5)))
    return store


def test_iast_round_trains_on_the_region_guided_loss(ray_cluster, benchmark_data, small_checkpoint, tmp_path):
    """Without a teacher the round's loss is L_seg + w_c·R_c + w_i·R_i, not plain cross-entropy."""
    store = _cbst_store(tmp_path, benchmark_data, small_checkpoint)
    m = fit(_cfg(tmp_path, benchmark_data, name="iast", stage="self_training", source=None, label_store=store,
                 init=small_checkpoint, iterations=2, confident_weight=0.1, ignored_weight=3.0)).metrics
    assert m["train/confident_reg"] > 0 and m["train/ignored_reg"] > 0
    expected = m["train/seg"] + 0.1 * m["train/confident_reg"] + 3.0 * m["train/ignored_reg"]
    assert m["train/loss"] == pytest.approx(expected, rel=1e-5)
    assert m["train/loss"] > m["train/seg"] + 0.01


def test_adversarial_loss_is_the_generators_whole_objective(ray_cluster, benchmark_data, tmp_path):
    m = fit(_cfg(tmp_path, benchmark_data, name="adv", stage="adversarial", target=benchmark_data["target"],
                 iterations=2, adversarial_weight=0.5)).metrics
    assert m["train/adversarial"] > 0 and m["train/discriminator"] > 0
    assert m["train/loss"] == pytest.approx(m["train/seg"] + 0.5 * m["train/adversarial"], rel=1e-5)


def test_hiast_round_learns_against_an_ema_teacher_and_resumes_it(ray_cluster, benchmark_data, small_checkpoint,
                                                                   tmp_path):
    store = _cbst_store(tmp_path, benchmark_data, small_checkpoint)
    kw = dict(stage="self_training", source=None, label_store=store, init=small_checkpoint, iterations=4,
              teacher_momentum=0.9, consistency_weight=0.5, hard_classes=5, max_failures=0)

    def crash(step, model):
        if step == 3:
            raise RuntimeError("simulated crash")

    straight = fit(_cfg(tmp_path, benchmark_data, name="straight", **kw))
    with pytest.raises(Exception, match="simulated crash"):
        fit(_cfg(tmp_path, benchmark_data, name="resumed", **kw), on_step=crash)
    resumed = fit(_cfg(tmp_path, benchmark_data, name="resumed", **kw))  # from the step-2 checkpoint

    assert straight.metrics["train/consistency"] > 0
    state, again = (torch.load(r.checkpoint, weights_only=True) for r in (straight, resumed))
    init = torch.load(small_checkpoint, weights_only=True)["model"]
    key = "classifier.convs.0.weight"
    # the teacher is checkpointed and restored: the resumed run ends with the same teacher
    for name, value in state["teacher"].items():
        assert torch.equal(value, again["teacher"][name]), name
        assert torch.equal(state["model"][name], again["model"][name]), name
    # it trails the student: moved from the initial weights, not as far as the student
    teacher, student, start = state["teacher"][key], state["model"][key], init[key]
    assert 0 < (teacher - start).norm() < (student - start).norm()


def test_teacher_only_for_self_training(benchmark_data, tmp_path):
    with pytest.raises(ValueError, match="self_training only"):
        _cfg(tmp_path, benchmark_data, teacher_momentum=0.99)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        _cfg(tmp_path, benchmark_data, stage="self_training", teacher_momentum=1.0)
    with pytest.raises(ValueError, match="self_training only"):
        _cfg(tmp_path, benchmark_data, hard_classes=14)
    with pytest.raises(ValueError, match="0..19"):
        _cfg(tmp_path, benchmark_data, stage="self_training", hard_classes=20)


def test_pseudo_labels_are_enlarged_to_the_image_not_the_image_shrunk(tmp_path):
    """Labels made at 1280x640 train on the 2048x1024 image (so §5's crop heights hold):
    the label is enlarged, nearest neighbour; the image is read as it is."""
    from PIL import Image

    from pipeline.data.streams import pseudo_labelled as _pseudo_labelled_loader

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    label = rng.integers(0, 19, (4, 6), dtype=np.uint8)
    label[0, 0] = 255
    store = LabelStore(str(tmp_path / "store"))
    store.write_labels(0, [{
        "index": 0, "name": "a", "image": str(tmp_path / "a.png"), "height": 4, "width": 6,
        "label": label.tobytes(), "thresholds": [0.9] * 19, "class_pixels": [1] * 19,
        "class_kept": [0] * 19, "class_correct": None,
    }], {"config_hash": "h"})
    store.commit({"num_parts": 1, "num_images": 1, "config_hash": "h"})

    load, size = _pseudo_labelled_loader(str(tmp_path / "store"))
    got_image, got_label = load(0)
    assert size == 1
    np.testing.assert_array_equal(got_image, image)
    assert got_label.shape == (8, 12)
    np.testing.assert_array_equal(got_label, label.repeat(2, axis=0).repeat(2, axis=1))


def test_decoded_cache_decodes_each_sample_once_within_its_budget():
    from pipeline.data.streams import DecodedCache

    calls = []

    def load(i):
        calls.append(i)
        return np.full((64, 64, 3), i, np.uint8), np.full((64, 64), i, np.uint8)  # 16 KiB a sample

    cache = DecodedCache(load, budget_mb=2 * 16 / 1024)  # room for two samples
    for i in (0, 1, 0, 1, 2, 2, 0):
        image, label = cache(i)
        assert image[0, 0, 0] == i and label[0, 0] == i
    assert calls == [0, 1, 2, 2]  # 0 and 1 kept, 2 over the budget: decoded every time
    assert cache.used == 2 * (64 * 64 * 4)
    image, _ = cache(0)
    with pytest.raises(ValueError, match="read-only"):
        image[0, 0, 0] = 7  # a transform writing into a cached sample fails loudly


def test_periodic_validation_keeps_the_best_and_the_kept_steps_survive_rotation(benchmark_data, tmp_path):
    from pipeline.models import build_model, load_checkpoint
    from pipeline.train import fit_local, kept_checkpoint

    weights = {}

    def remember(step, method):
        weights[step] = {k: v.clone() for k, v in method.student.state_dict().items()}

    cfg = _cfg(tmp_path, benchmark_data, iterations=6, val=benchmark_data["val"], val_every=2, keep_steps=(3,),
               eval_size=(64, 32))
    result = fit_local(cfg, on_step=remember)
    # the rotation kept the last two checkpoints (4, 6); step 3 and the best are kept beside them
    assert sorted(os.listdir(tmp_path / "runs" / "run")) == ["checkpoint_000000004", "checkpoint_000000006", "kept"]
    assert result.kept == {"best": kept_checkpoint(cfg, "best"), "step_3": kept_checkpoint(cfg, "step_3")}
    model = build_model("deeplabv2_small", 19)
    step3 = load_checkpoint(model, result.kept["step_3"])
    assert step3["step"] == 3
    assert all(torch.equal(v, weights[3][k]) for k, v in model.state_dict().items())
    best = load_checkpoint(model, result.kept["best"])
    assert best["step"] == result.metrics["best/step"] in (2, 4, 6)
    assert best["metrics"]["val/mIoU-19"] == result.metrics["best/val/mIoU-19"] >= result.metrics["val/mIoU-19"]
    assert all(torch.equal(v, weights[best["step"]][k]) for k, v in model.state_dict().items())


def test_the_best_so_far_survives_a_resume(benchmark_data, tmp_path):
    from pipeline.train import fit_local

    cfg = _cfg(tmp_path, benchmark_data, iterations=4, val=benchmark_data["val"], val_every=2, eval_size=(64, 32))
    whole = fit_local(cfg)

    def stop_at_3(step, method):
        if step == 3:
            raise KeyboardInterrupt

    other = _cfg(tmp_path, benchmark_data, name="interrupted", iterations=4, val=benchmark_data["val"], val_every=2,
                 eval_size=(64, 32))
    with pytest.raises(KeyboardInterrupt):
        fit_local(other, on_step=stop_at_3)
    resumed = fit_local(other)  # from step 2's checkpoint, which carries the best so far
    assert (resumed.metrics["best/step"], resumed.metrics["best/val/mIoU-19"]) == \
        (whole.metrics["best/step"], whole.metrics["best/val/mIoU-19"])


def test_stage_settings_of_the_released_protocol_are_checked(benchmark_data, tmp_path):
    with pytest.raises(ValueError, match="keep_steps \\[9\\] are outside"):
        _cfg(tmp_path, benchmark_data, keep_steps=(9,))
    with pytest.raises(ValueError, match="no val data"):
        _cfg(tmp_path, benchmark_data, val_every=2)
    with pytest.raises(ValueError, match="val_metric"):
        _cfg(tmp_path, benchmark_data, val=benchmark_data["val"], val_metric="mIoU-20")


def test_the_discriminator_follows_the_students_cosine_when_asked(benchmark_data, tmp_path):
    from pipeline.methods.adversarial import Adversarial
    from pipeline.models import build_model

    kw = dict(stage="adversarial", target=benchmark_data["target"], iterations=100, lr=2e-5, discriminator_lr=2e-5)
    constant = Adversarial(_cfg(tmp_path, benchmark_data, **kw), build_model("deeplabv2_small", 19), torch.device("cpu"))
    assert constant.discriminator_lr(1) == constant.discriminator_lr(100) == 2e-5
    assert constant.d_optimizer.defaults["betas"] == (0.9, 0.99)
    released = Adversarial(_cfg(tmp_path, benchmark_data, discriminator_schedule="cosine", lr_floor_of="head",
                                discriminator_betas=(0.9, 0.999), **kw), build_model("deeplabv2_small", 19),
                           torch.device("cpu"))
    assert released.d_optimizer.defaults["betas"] == (0.9, 0.999)
    assert released.discriminator_lr(1) == pytest.approx(2e-5)
    assert released.discriminator_lr(51) == pytest.approx(1e-5, rel=1e-2)  # half-way down the cosine
    assert released.discriminator_lr(101) == pytest.approx(2e-8)  # the floor: 0.001 x the student's lr


def _bn_worker(rank: int, port: int, cfgs: list[dict], folder: str) -> None:
    """One of two DDP replicas of source-only stages in a plain gloo process group (no
    Ray): after each step, writes the first batch-norm layer's type and running mean."""
    import torch.distributed as dist

    from pipeline.models.deeplab import batchnorm_layers
    from pipeline.train import LocalSession, run_stage

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    for cfg in cfgs:
        train = config.from_dict(TrainConfig, cfg)

        def record(step, method):
            bn = batchnorm_layers(method.student)[0]
            with open(os.path.join(folder, f"{train.name}{rank}.log"), "a") as f:
                f.write(f"{step} {type(bn).__name__} {' '.join(f'{v:.6f}' for v in bn.running_mean.tolist())}\n")

        run_stage(train, LocalSession(train), on_step=record)
    dist.destroy_process_group()


def test_a_two_worker_stage_normalises_over_both_workers_batches(benchmark_data, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfgs = [config.to_dict(_cfg(tmp_path, benchmark_data, name=name, iterations=2, num_workers=2, batch_size=4,
                                sync_batchnorm=name == "synced"))
            for name in ("synced", "apart")]
    mp.spawn(_bn_worker, args=(port, cfgs, str(tmp_path)), nprocs=2, join=True)
    for name, layer in (("synced", "GlooSyncBatchNorm"), ("apart", "BatchNorm2d")):
        logs = [(tmp_path / f"{name}{r}.log").read_text().splitlines() for r in (0, 1)]
        assert len(logs[0]) == 2 and all(line.split()[1] == layer for line in logs[0])
        # after each step, both replicas' statistics come from the same (global) batch only when synchronised
        assert (logs[0] == logs[1]) == (name == "synced")
