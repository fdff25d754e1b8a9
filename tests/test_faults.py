"""Faults the pipeline survives: the S3 endpoint lost mid-write, a full disk under the output.

Each test makes the fault for real (a network cut in front of a real S3 server, a small
tmpfs that fills up), checks the error names the URI and the fix, that nothing looks
complete that is not, and that the same command, run again once the fault is gone,
resumes with what was finished and ends as an undisturbed run.
"""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest

from outage import Outage
from pipeline import storage
from pipeline.data.datasets import DataConfig
from pipeline.label_store import LabelStore
from pipeline.pseudo_label import PseudoLabelConfig, SelectorConfig, run


def _cfg(store: str, target, checkpoint: str) -> PseudoLabelConfig:
    return PseudoLabelConfig(
        target=target, store=store, checkpoint=checkpoint, arch="deeplabv2_small", size=(64, 32),
        part_size=3, num_previews=1, selector=SelectorConfig("cbst", portion=0.5),
    )


def _rows(store: LabelStore, num_parts: int) -> tuple[list[dict], list]:
    """Every label row and every prediction record of a complete store."""
    return store.read_labels().to_pylist(), [(r.index, r.name, r.prediction.tobytes()) for r in
                                              store.iter_predictions(num_parts)]


# -- S3: the endpoint lost mid-write --------------------------------------------------------


@pytest.fixture
def outage(s3_server, monkeypatch):
    """The driver reaches the test S3 server through an `Outage` proxy it can cut (Ray's
    workers, which only read images and weights, keep the direct endpoint); a fresh bucket."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    proxy = Outage(("127.0.0.1", int(s3_server.endpoint.rsplit(":", 1)[1])))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield proxy, bucket
    proxy.cut()


def _server_keys(s3_server, bucket: str, prefix: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=s3_server.endpoint)  # around the proxy
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/"))


@pytest.mark.slow  # three labelling runs
def test_s3_lost_in_the_middle_of_a_part_then_the_rerun_resumes(
    ray_cluster, s3_server, s3_round_inputs, outage, monkeypatch
):
    proxy, inputs = outage[0], s3_round_inputs
    target = DataConfig("cityscapes", inputs.target, "train")
    store_uri = f"s3://{inputs.bucket}/round1/labels"
    clean_uri = f"s3://{inputs.bucket}/clean/labels"
    cfg = _cfg(store_uri, target, inputs.generator)

    # Cut the connection 1000 bytes into the upload of the second prediction part: the
    # request line and headers reach the server, the body does not.
    write_predictions = LabelStore.write_predictions

    def cut_in_part_1(self, part, rows, metadata):
        if part == 1 and proxy.cuts == 0:
            proxy.cut_on(f"PUT /{inputs.bucket}/round1/labels/predictions/.tmp-".encode(), after=1000)
        return write_predictions(self, part, rows, metadata)

    monkeypatch.setattr(LabelStore, "write_predictions", cut_in_part_1)
    with pytest.raises(storage.StorageError) as failure:
        run(cfg)
    message = str(failure.value)
    assert proxy.cuts == 1
    assert message.startswith(f"writing {store_uri}/predictions/part-00001.parquet failed")
    assert "the storage is unreachable" in message and "run the same command again" in message

    proxy.restore()  # the endpoint is back; the server kept what it had
    store = LabelStore(store_uri)
    assert not store.is_complete()
    assert store.finished_prediction_parts(4, "any") == set()  # wrong hash: nothing finished
    keys = _server_keys(s3_server, inputs.bucket, "round1/labels/")
    assert keys == ["round1/labels/predictions/part-00000.parquet"]  # no torn part 1, no temporary

    manifest = run(cfg)  # the same command
    assert manifest["prediction_parts_reused"] == 1 and manifest["num_parts"] == 4
    clean = run(_cfg(clean_uri, target, inputs.generator))  # undisturbed, same inputs
    assert clean["prediction_parts_reused"] == 0
    assert manifest["statistics"] == clean["statistics"]
    assert _rows(store, 4) == _rows(LabelStore(clean_uri), 4)  # same rows, none lost or twice
    assert [r["name"] for r in store.read_labels(columns=["name"]).to_pylist()] == sorted(
        s.name for s in target.samples())
    assert not [k for k in _server_keys(s3_server, inputs.bucket, "round1/") if ".tmp-" in k]


def test_s3_lost_between_a_copy_and_its_delete_leaves_no_temporary_in_the_committed_store(
    s3_server, outage
):
    """On S3 a rename is a copy then a delete: cut after the copy, the part is there and
    whole, its temporary is left; the commit removes it."""
    from test_s3 import _prediction_rows

    proxy, bucket = outage
    store = LabelStore(f"s3://{bucket}/store")
    store.write_predictions(0, _prediction_rows([0, 1]), {"config_hash": "h"})
    proxy.cut_on(f"DELETE /{bucket}/store/predictions/.tmp-".encode())
    with pytest.raises(storage.StorageError, match="unreachable"):
        store.write_predictions(1, _prediction_rows([2, 3]), {"config_hash": "h"})
    proxy.restore()
    keys = _server_keys(s3_server, bucket, "store/")
    assert len([k for k in keys if "/.tmp-" in k]) == 1
    assert store.finished_prediction_parts(2, "h") == {0, 1}  # the copy made a whole part
    assert [r.index for r in store.iter_predictions(2)] == [0, 1, 2, 3]
    store.commit({"num_parts": 0})
    assert _server_keys(s3_server, bucket, "store/") == [
        "store/manifest.json", "store/predictions/part-00000.parquet", "store/predictions/part-00001.parquet"]


def test_an_unreachable_s3_is_a_storage_error_naming_the_uri(outage):
    proxy, bucket = outage
    uri = f"s3://{bucket}/runs/record.json"
    storage.write_bytes(uri, b"{}")
    proxy.cut()
    with pytest.raises(storage.StorageError, match=f"^reading {uri} failed: .*unreachable"):
        storage.read_bytes(uri)  # botocore's EndpointConnectionError, not an OSError, underneath
    proxy.restore()
    assert storage.read_bytes(uri) == b"{}"


# -- a full disk under the output -------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted for the test (root only), unmounted after it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def _fill(disk: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free on ``disk``."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(free - leave, 0))
    return filler


def test_a_full_disk_is_a_storage_error_and_leaves_no_half_file(small_disk):
    uri = str(small_disk / "out" / "record.json")
    storage.write_bytes(uri, b"old")
    with pytest.raises(storage.StorageError, match=f"^writing {uri} failed: .*the disk is full") as failure:
        storage.write_bytes(uri, b"x" * 2**21)  # 2 MiB on a 1 MiB disk
    assert failure.value.errno == errno.ENOSPC
    assert Path(uri).read_bytes() == b"old"  # the old file whole, no temporary beside it
    assert sorted(p.name for p in (small_disk / "out").iterdir()) == ["record.json"]


@pytest.mark.slow  # two labelling runs
def test_a_full_disk_while_labelling_leaves_no_complete_looking_store_then_the_rerun_resumes(
    ray_cluster, small_disk, benchmark_data, small_checkpoint, tmp_path
):
    clean = run(_cfg(str(tmp_path / "clean"), benchmark_data["target"], small_checkpoint))
    parts = sorted((tmp_path / "clean" / "predictions").glob("part-*.parquet"))
    page = os.statvfs(small_disk).f_frsize
    # room for the first two prediction parts (tmpfs counts whole pages), not for the rest
    room = sum(-(-p.stat().st_size // page) * page for p in parts[:2]) + page // 2
    filler = _fill(small_disk, room)
    store_uri = str(small_disk / "labels")
    cfg = _cfg(store_uri, benchmark_data["target"], small_checkpoint)

    with pytest.raises(storage.StorageError) as failure:
        run(cfg)
    message = str(failure.value)
    assert message.startswith(f"writing {store_uri}/predictions/part-0000") and "the disk is full" in message
    store = LabelStore(store_uri)
    assert not store.is_complete()
    written = sorted((small_disk / "labels" / "predictions").iterdir())
    assert [p.name for p in written] == ["part-00000.parquet", "part-00001.parquet"]  # no temporary
    for mine, theirs in zip(written, parts):
        assert pq.read_table(mine).equals(pq.read_table(theirs))  # whole parts, as undisturbed

    filler.unlink()  # space freed
    manifest = run(cfg)
    assert manifest["prediction_parts_reused"] == 2
    assert manifest["statistics"] == clean["statistics"]
    assert _rows(store, 4) == _rows(LabelStore(str(tmp_path / "clean")), 4)
