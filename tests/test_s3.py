"""Everything that reads or writes storage, against a real S3 server (moto, on loopback).

Each test gets its own bucket; the driver reaches the server through AWS_ENDPOINT_URL
and fake credentials (set here), Ray's workers through the job runtime_env that
``ray_cluster`` is started with (see tests/s3_server.py). Where a local run exists, the
S3 run must give the very same result.
"""

from __future__ import annotations

import urllib.request
import uuid

import boto3
import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.data import benchmark
from pipeline.data.datasets import DataConfig, list_samples, load_image, load_label
from pipeline.data.prepare import prepare
from pipeline.label_store import LabelStore, decode_label
from s3_server import MotoServer


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh, empty bucket: its ``s3://`` URI."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    _client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


def _client():
    return boto3.client("s3")  # endpoint and credentials from the environment


def _keys(uri: str) -> list[str]:
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    pages = _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _upload(local, uri: str) -> str:
    fs, path = storage.filesystem(uri)
    fs.put(str(local), path, recursive=True)
    return uri


def test_storage_reads_writes_and_tests_objects_on_s3(s3):
    uri = storage.join(s3, "a", "b.bin")
    assert uri == f"{s3}/a/b.bin"
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"\x00payload")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"\x00payload"
    bucket = s3[len("s3://"):]
    assert _client().get_object(Bucket=bucket, Key="a/b.bin")["Body"].read() == b"\x00payload"  # really on the server
    with storage.open_file(storage.join(s3, "c.txt"), "wb") as f:
        f.write(b"text")
    assert _keys(s3) == ["a/b.bin", "c.txt"]
    fs, path = storage.arrow_filesystem(uri)
    assert fs.get_file_info(path).size == 8
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(s3, "missing"))


def test_the_test_server_is_stopped_for_sure():
    with MotoServer() as server:
        process = server.process
        urllib.request.urlopen(server.endpoint + "/", timeout=5).close()
        server.stop(grace=0.2)  # SIGTERM, then SIGKILL: moto may ignore the SIGTERM
        assert process.poll() is not None
        with pytest.raises(OSError):
            urllib.request.urlopen(server.endpoint + "/", timeout=5)


def _prediction_rows(indices, h=4, w=6):
    rows = []
    for i in indices:
        pred = (np.arange(h * w, dtype=np.uint8) + i) % 19
        rows.append(
            {"index": i, "name": f"im{i:02d}", "image": f"s3://x/im{i:02d}.png", "height": h, "width": w,
             "prediction": pred.tobytes(), "confidence": np.full(h * w, 0.5, "<f2").tobytes(),
             "class_pixels": np.bincount(pred, minlength=19).tolist(), "ground_truth": None}
        )
    return rows


def test_label_store_round_trip_on_s3(s3):
    store = LabelStore(storage.join(s3, "round1", "labels"))
    store.write_predictions(0, _prediction_rows([0, 1]), {"config_hash": "h1"})
    store.write_predictions(1, _prediction_rows([2, 3]), {"config_hash": "h1"})
    assert store.finished_prediction_parts(3, "h1") == {0, 1}
    assert store.finished_prediction_parts(3, "other") == set()
    records = list(store.iter_predictions(2))
    assert [r.index for r in records] == [0, 1, 2, 3]
    assert records[3].prediction.shape == (4, 6) and records[3].prediction[0, 0] == 3
    assert not store.is_complete()
    for part, indices in ((0, [0, 1]), (1, [2, 3])):
        rows = [
            {"index": i, "name": f"im{i:02d}", "image": "s3://x", "height": 4, "width": 6,
             "label": np.full(24, i, np.uint8).tobytes(), "thresholds": [0.9] * 19,
             "class_pixels": [0] * 19, "class_kept": [0] * 19, "class_correct": None}
            for i in indices
        ]
        store.write_labels(part, rows, {"config_hash": "h1"})
    store.commit({"num_parts": 2, "num_classes": 19})
    assert store.is_complete() and store.manifest()["num_parts"] == 2
    labels = store.read_labels().to_pylist()
    assert [decode_label(r)[0, 0] for r in labels] == [0, 1, 2, 3]
    keys = [k for k in _keys(store.uri) if not k.endswith("/")]  # pyarrow also writes folder markers
    assert not [k for k in keys if ".tmp-" in k]  # every temporary object was renamed
    assert [k.split("/labels/", 1)[1] for k in keys] == [
        "labels/part-00000.parquet", "labels/part-00001.parquet", "manifest.json",
        "predictions/part-00000.parquet", "predictions/part-00001.parquet",
    ]
    store.invalidate()
    assert not store.is_complete()


def test_benchmark_generation_preparation_and_reading_on_s3(s3, benchmark_data):
    root = storage.join(s3, "benchmark")
    benchmark.generate(root, seed=3, num_source=2, num_target_train=2, num_target_val=1, workers=1)
    prepare("gta5", storage.join(root, "source"), workers=1)
    prepare("cityscapes", storage.join(root, "target"), workers=1)
    assert storage.exists(storage.join(root, "target", "lists", "cityscapes_train.txt"))

    remote = list_samples("gta5", storage.join(root, "source"), "train")
    assert [s.name for s in remote] == ["00001", "00002"]
    assert remote[0].image.startswith(root) and remote[0].label.startswith(root)
    local = {s.name: s for s in benchmark_data["source"].samples()}  # same seed, written locally
    for sample in remote:
        np.testing.assert_array_equal(load_image(sample.image), load_image(local[sample.name].image))
        np.testing.assert_array_equal(load_label(sample.label), load_label(local[sample.name].label))
    val = DataConfig("cityscapes", storage.join(root, "target"), "val").samples()
    local_val = {s.name: s for s in benchmark_data["val"].samples()}
    assert len(val) == 1
    np.testing.assert_array_equal(load_label(val[0].label), load_label(local_val[val[0].name].label))


def test_pseudo_labelling_with_data_checkpoint_and_store_on_s3(
    ray_cluster, s3, benchmark_data, small_checkpoint, tmp_path
):
    from pipeline.pseudo_label import PseudoLabelConfig, SelectorConfig, run

    target = DataConfig("cityscapes", _upload(benchmark_data["target"].root, storage.join(s3, "target")), "train")
    checkpoint = storage.join(s3, "weights", "small.pt")
    storage.write_bytes(checkpoint, open(small_checkpoint, "rb").read())

    def config(store, target, checkpoint):
        return PseudoLabelConfig(
            target=target, store=store, checkpoint=checkpoint, arch="deeplabv2_small", size=(64, 32),
            part_size=4, num_previews=1, selector=SelectorConfig("cbst", portion=0.5),
        )

    remote = run(config(storage.join(s3, "labels"), target, checkpoint))
    local = run(config(str(tmp_path / "labels"), benchmark_data["target"], small_checkpoint))
    assert remote["num_images"] == 10 and remote["num_parts"] == 3
    assert remote["previews"][0].startswith(s3) and storage.exists(remote["previews"][0])
    assert remote["statistics"] == local["statistics"]
    remote_rows = LabelStore(storage.join(s3, "labels")).read_labels(columns=["name", "label", "thresholds"])
    local_rows = LabelStore(str(tmp_path / "labels")).read_labels(columns=["name", "label", "thresholds"])
    assert remote_rows.to_pylist() == local_rows.to_pylist()  # the same labels, bit for bit


def test_ray_train_stage_with_data_and_checkpoints_on_s3(ray_cluster, s3, benchmark_data):
    from pipeline.train import TrainConfig, fit

    source = DataConfig("gta5", _upload(benchmark_data["source"].root, storage.join(s3, "source")))
    cfg = TrainConfig(
        stage="source_only", name="s3run", storage=storage.join(s3, "runs"), iterations=2, lr=1e-3,
        arch="deeplabv2_small", source=source, batch_size=2, crop_size=(64, 32), source_crop_heights=(48, 96),
        checkpoint_every=1, log_every=1, loader_workers=0, num_workers=1, cpus_per_worker=1,
    )
    result = fit(cfg)
    assert result.checkpoint.startswith(f"{s3}/runs/s3run/") and storage.exists(result.checkpoint)
    with storage.open_file(result.checkpoint) as f:
        state = torch.load(f, weights_only=True)
    assert state["step"] == 2 and state["config"]["storage"] == cfg.storage
    assert result.metrics["step"] == 2 and np.isfinite(result.metrics["train/loss"])
