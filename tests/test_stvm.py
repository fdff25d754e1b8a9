"""STvM (pipeline.methods.stvm): its parts by hand, and the stage on tiny data without Ray."""

import hashlib
import math
import os

import pytest
import torch

from pipeline.data import streams
from pipeline.label_store import LabelStore
from pipeline.methods.stvm import (
    MetricNetwork,
    STvMConfig,
    classmix_mask,
    proxy_anchor_loss,
    proxy_nca_loss,
    reliability,
    reliability_weighted_loss,
)
from pipeline.train import TrainConfig, check_config, fit_local


def _cfg(tmp_path, data, checkpoint, **kw):
    base = dict(
        stage="stvm", name="stvm", storage=str(tmp_path / "runs"), iterations=4, lr=1e-3, arch="deeplabv2_small",
        init=checkpoint, target=data["target"], batch_size=2, crop_size=(64, 32), target_crop_heights=(48, 96),
        checkpoint_every=2, log_every=1, loader_workers=0, num_workers=1, cpus_per_worker=1,
        stvm=STvMConfig(teacher_momentum=0.9, metric_pixels=64),
    )
    base.update(kw)
    return TrainConfig(**base)


def test_a_pixel_of_reliability_zero_gives_no_gradient():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    labels = torch.tensor([[[0, 1], [2, 0]]])
    weights = torch.tensor([[[1.0, 0.0], [0.5, 1.0]]])
    reliability_weighted_loss(logits, labels, weights).backward()
    grad = logits.grad.abs().sum(1)[0]
    assert grad[0, 1] == 0
    assert (grad[0, 0] > 0) and (grad[1, 0] > 0) and (grad[1, 1] > 0)
    # and a pixel's gradient scales with its weight
    full = torch.randn(1, 3, 1, 1, requires_grad=True)
    for w in (1.0, 0.5):
        full.grad = None
        reliability_weighted_loss(full, torch.tensor([[[1]]]), torch.tensor([[[w]]])).backward()
        if w == 1.0:
            g1 = full.grad.clone()
    assert torch.allclose(full.grad, 0.5 * g1)
    # soft targets (the teacher's softmax): the same rule
    logits.grad = None
    soft = torch.softmax(torch.randn(1, 3, 2, 2), 1)
    reliability_weighted_loss(logits, soft, weights).backward()
    grad = logits.grad.abs().sum(1)[0]
    assert grad[0, 1] == 0 and (grad[0, 0] > 0) and (grad[1, 1] > 0)
    one_hot = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    assert torch.allclose(reliability_weighted_loss(logits, one_hot, weights),
                          reliability_weighted_loss(logits, labels, weights))


def test_proxy_anchor_loss_on_a_hand_case():
    # two samples, three proxies; class 2 has no sample
    cos = torch.tensor([[0.9, 0.2, -0.1], [0.3, 0.7, 0.0]])
    labels = torch.tensor([0, 1])
    a, d = 32.0, 0.1
    pos = (math.log(1 + math.exp(-a * (0.9 - d))) + math.log(1 + math.exp(-a * (0.7 - d)))) / 2
    neg = (math.log(1 + math.exp(a * (0.3 + d)))  # class 0: sample 1 is a negative
           + math.log(1 + math.exp(a * (0.2 + d)))  # class 1: sample 0
           + math.log(1 + math.exp(a * (-0.1 + d)) + math.exp(a * (0.0 + d)))) / 3  # class 2: both
    assert proxy_anchor_loss(cos, labels, d, a).item() == pytest.approx(pos + neg, rel=1e-5)
    # Proxy-NCA: softmax cross-entropy of the scaled cosines
    expected = -(torch.log_softmax(a * cos, 1)[0, 0] + torch.log_softmax(a * cos, 1)[1, 1]) / 2
    assert proxy_nca_loss(cos, labels, a).item() == pytest.approx(expected.item(), rel=1e-5)


def test_proxy_anchor_pulls_embeddings_to_their_proxies():
    torch.manual_seed(0)
    metric = MetricNetwork(in_channels=8, num_classes=3, hidden_dim=16, embedding_dim=4)
    features = torch.randn(2, 8, 4, 4)
    labels = (features[:, 0] > 0).long() + (features[:, 1] > 0.5).long()  # a learnable labelling
    optimizer = torch.optim.Adam(metric.parameters(), lr=1e-2)
    flat_labels = labels.reshape(-1)

    def loss():
        emb = metric(features).permute(0, 2, 3, 1).reshape(-1, 4)
        return proxy_anchor_loss(metric.cosines(emb), flat_labels)

    first = loss().item()
    for _ in range(100):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.5 * first
    cos = metric.cosines(metric(features))
    assert (reliability(cos, labels, 32.0) > 0.5).float().mean() > 0.8


def test_reliability_is_the_metric_softmax_at_the_teacher_label():
    cos = torch.zeros(1, 3, 1, 2)
    cos[0, 0, 0, 0] = 1.0  # pixel 0 sits on proxy 0
    cos[0, :, 0, 1] = torch.tensor([0.5, 0.5, 0.5])  # pixel 1: equally near all
    r = reliability(cos, torch.tensor([[[0, 0]]]), scale=32.0)
    assert r[0, 0, 0] > 0.999 and r[0, 0, 1] == pytest.approx(1 / 3, rel=1e-5)
    r = reliability(cos, torch.tensor([[[1, 2]]]), scale=32.0)
    assert r[0, 0, 0] < 1e-6  # labelled 1 where the metric says 0: unreliable


def test_the_mocm_mask_takes_the_most_reliable_classes():
    labels = torch.tensor([[1, 1, 2, 2], [3, 3, 4, 4]])
    weights = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.7, 0.9, 0.3, 0.1]])
    mask = classmix_mask(labels, weights, "reliable")
    assert torch.equal(mask, torch.isin(labels, torch.tensor([1, 3])))  # half of the 4 classes
    weights = torch.tensor([[0.1, 0.1, 0.9, 0.9], [0.1, 0.1, 0.8, 0.8]])
    assert torch.equal(classmix_mask(labels, weights, "reliable"), torch.isin(labels, torch.tensor([2, 4])))
    assert not classmix_mask(labels, weights, "none").any()
    random = classmix_mask(labels, weights, "random", torch.Generator().manual_seed(0))
    assert random.sum() == 4 and len(torch.unique(labels[random])) == 2
    assert classmix_mask(torch.full((2, 2), 5), torch.ones(2, 2), "reliable").all()  # one class: itself
    # "weighted": half the classes drawn with probability ∝ mean reliability
    weights = torch.tensor([[0.9, 0.9, 0.05, 0.05], [0.6, 0.6, 0.3, 0.3]])
    g = torch.Generator().manual_seed(0)
    picks = torch.stack([classmix_mask(labels, weights, "weighted", g) for _ in range(400)])
    share = {c: picks[:, labels == c].float().mean().item() for c in (1, 2, 3, 4)}
    assert all(picks[i].sum() == 4 for i in range(len(picks)))  # always two of the four classes
    assert share[1] > share[3] > share[4] > share[2]


def test_bad_stvm_settings_fail_before_training(tmp_path, benchmark_data, small_checkpoint):
    store = LabelStore(str(tmp_path / "labels"))
    store.commit({"num_classes": 19, "num_parts": 0})
    with pytest.raises(ValueError, match="source-free.*label_store"):
        check_config(_cfg(tmp_path, benchmark_data, small_checkpoint, label_store=store.uri))
    with pytest.raises(ValueError, match="source-free.*`source`"):
        check_config(_cfg(tmp_path, benchmark_data, small_checkpoint, source=benchmark_data["source"]))
    with pytest.raises(ValueError, match="needs `init`"):
        check_config(_cfg(tmp_path, benchmark_data, None))
    with pytest.raises(ValueError, match="stvm.teacher_momentum"):
        STvMConfig(teacher_momentum=1.0)
    with pytest.raises(ValueError, match="stage stvm only"):
        TrainConfig(stage="source_only", name="x", storage=str(tmp_path), iterations=1, lr=1e-3, stvm=STvMConfig())


def test_stvm_reads_target_images_only_and_logs_its_metrics(tmp_path, benchmark_data, small_checkpoint, monkeypatch):
    opened = []
    load_image = streams.load_image
    monkeypatch.setattr(streams, "load_image", lambda path: opened.append(path) or load_image(path))
    monkeypatch.setattr(streams, "LabelStore", None)  # any label store opened would fail
    result = fit_local(_cfg(tmp_path, benchmark_data, small_checkpoint))
    target = str(benchmark_data["target"].root)
    assert opened and all(path.startswith(target) for path in opened)
    assert not any("/source" in path for path in opened)
    m = result.metrics
    assert 0 < m["train/reliability"] <= 1 and m["train/metric_loss"] > 0
    assert 0 < m["train/mixed_share"] < 1  # two images a batch: each receives half the other's classes
    # the benchmark's target train split has labels: the teacher's precision, plain and weighted
    assert 0 <= m["stvm/teacher_precision"] <= 1 and 0 <= m["stvm/teacher_precision_weighted"] <= 1
    assert any(k.startswith("stvm/teacher_precision_weighted/") for k in m)
    state = torch.load(result.checkpoint, weights_only=True)
    assert {"teacher", "metric", "metric_optimizer"} <= set(state)
    assert state["metric"]["proxies"].shape == (19, 64)


def test_stvm_resumed_mid_stage_continues_teacher_metric_network_and_proxies(tmp_path, benchmark_data,
                                                                             small_checkpoint):
    def crash(step, method):
        if step == 3:
            raise RuntimeError("simulated crash")

    straight = fit_local(_cfg(tmp_path, benchmark_data, small_checkpoint, name="straight"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_local(_cfg(tmp_path, benchmark_data, small_checkpoint, name="resumed"), on_step=crash)
    resumed = fit_local(_cfg(tmp_path, benchmark_data, small_checkpoint, name="resumed"))  # from step 2
    a, b = (torch.load(r.checkpoint, weights_only=True) for r in (straight, resumed))
    for part in ("model", "teacher", "metric"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), (part, name)
    init = torch.load(small_checkpoint, weights_only=True)["model"]
    key = "classifier.convs.0.weight"
    assert 0 < (a["teacher"][key] - init[key]).norm() < (a["model"][key] - init[key]).norm()


def _ddp_worker(rank: int, port: int, cfg: dict, folder: str) -> None:
    """One of two DDP replicas in a plain process group (gloo), no Ray: the loop's
    LocalSession wraps the student in DDP as Ray Train would."""
    import torch.distributed as dist

    from pipeline import config as config_lib
    from pipeline.train import LocalSession, run_stage

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)

    def digest(tensors) -> str:
        return hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in tensors)).hexdigest()

    def record(step, method):
        with open(os.path.join(folder, f"rank{rank}.log"), "a") as f:
            f.write(f"{step} {digest(method.student.parameters())} {digest(method.metric.parameters())} "
                    f"{digest(method.teacher.state_dict().values())}\n")

    train = config_lib.from_dict(TrainConfig, cfg)
    metrics = run_stage(train, LocalSession(train), on_step=record)
    with open(os.path.join(folder, f"rank{rank}.metrics"), "w") as f:
        f.write(str(metrics["train/mixed_share"]))
    dist.destroy_process_group()


def test_ddp_keeps_student_metric_network_and_proxies_identical(tmp_path, benchmark_data, small_checkpoint):
    import socket

    import torch.multiprocessing as mp

    from pipeline import config as config_lib

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = config_lib.to_dict(_cfg(tmp_path, benchmark_data, small_checkpoint, num_workers=2, batch_size=4))
    mp.spawn(_ddp_worker, args=(port, cfg, str(tmp_path)), nprocs=2, join=True)
    logs = [open(os.path.join(tmp_path, f"rank{r}.log")).read().split("\n") for r in (0, 1)]
    assert len(logs[0]) == 5 and logs[0] == logs[1]  # 4 steps: every module equal on both replicas
    assert float(open(os.path.join(tmp_path, "rank0.metrics")).read()) > 0  # two images a worker: mixed
