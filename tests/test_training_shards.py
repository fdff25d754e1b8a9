"""What a training worker takes from a label store and hands its model: only its shard's
rows (read row group by row group), as uint8 tensors through the DataLoader, normalised
on the device to the same float input as before."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import distributed
from pipeline.data import streams
from pipeline.data.transforms import Compose, Normalize, model_input, normalize, train_transform, weak_strong_transform
from pipeline.label_store import LabelStore
from pipeline.methods.iast import hard_class_paste

PARTS = (40, 40, 20)  # rows per labels part; row groups of 16


@pytest.fixture
def store(tmp_path):
    """100 label rows in 3 parts; row i's label map is filled with i (which names the row;
    it keeps class i % 19)."""
    rng = np.random.default_rng(0)
    store = LabelStore(str(tmp_path / "store"))
    index = 0
    for part, n in enumerate(PARTS):
        rows = []
        for _ in range(n):
            image = str(tmp_path / f"{index:03d}.png")
            Image.fromarray(rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)).save(image)
            kept = [0] * 19
            kept[index % 19] = 16 * 32
            rows.append({"index": index, "name": f"{index:03d}", "image": image, "height": 16, "width": 32,
                         "label": np.full((16, 32), index, np.uint8).tobytes(), "thresholds": [0.9] * 19,
                         "class_pixels": kept, "class_kept": kept, "class_correct": None})
            index += 1
        store.write_labels(part, rows, {"config_hash": "h"})
    store.commit({"num_parts": len(PARTS), "num_images": index, "config_hash": "h",
                  "statistics": {"confidence": [0.5] * 19}})
    return store


@pytest.fixture
def rows_read(monkeypatch):
    """Rows each read of a label part returns, as this process reads them."""
    counts = []
    read_row_group = pq.ParquetFile.read_row_group

    def counted(self, *args, **kwargs):
        table = read_row_group(self, *args, **kwargs)
        counts.append(table.num_rows)
        return table

    def whole_part(*args, **kwargs):
        raise AssertionError("a training worker read a whole label part")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    monkeypatch.setattr(pq, "read_table", whole_part)
    return counts


def _as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: world)


@pytest.mark.parametrize("rank, shard, groups_read", [(0, range(0, 50), 40 + 16), (1, range(50, 100), 40 + 20)])
def test_each_rank_reads_only_its_shard_of_the_label_store(store, rows_read, monkeypatch, rank, shard, groups_read):
    _as_rank(monkeypatch, rank, 2)
    load, size = streams.pseudo_labelled(store.uri)
    assert size == len(shard)
    assert [int(load(i)[1][0, 0]) for i in range(size)] == list(shard)  # its rows, in order
    # the row groups holding them (16 rows each, parts of 40, 40, 20), not the store's 100 rows
    assert sum(rows_read) == groups_read

    # HIAST's donors come from the same shard: indices into it
    rows_read.clear()
    paste = hard_class_paste(store.uri, load, 19)
    assert sum(rows_read) == groups_read
    donors = np.concatenate(list(paste.donors.values()))
    assert donors.max() < size and {int(load(int(i))[1][0, 0]) for i in donors} <= set(shard)


def test_a_sharded_stream_draws_from_its_shard_and_batches_are_uint8(store, monkeypatch):
    _as_rank(monkeypatch, 1, 2)
    cfg = SimpleNamespace(batch_size=4, crop_size=(32, 16), seed=5, decoded_cache_mb=0, loader_workers=0,
                          use_gpu=False)
    batches = streams.batches(streams.pseudo_labelled(store.uri), (8, 16), cfg, 0, 0, sharded=True)
    seen = set()
    for _ in range(30):  # 60 samples: more than an epoch of the shard's 50 rows
        image, label = next(batches)
        assert image.dtype == torch.uint8 and image.shape == (2, 16, 32, 3)
        assert label.dtype == torch.uint8 and label.shape == (2, 16, 32)
        seen |= set(label.flatten().tolist())
    assert seen == set(range(50, 100))  # every row of the shard, no other


def test_a_worker_holds_its_shards_labels_compressed_and_never_all_at_once(tmp_path):
    """64 labels at the rounds' 1536x768 (75 MB raw): the worker keeps a few KB each, and
    reading them holds one row group of 16 raw labels at a time, not the shard."""
    import tracemalloc

    height, width = 768, 1536
    image = str(tmp_path / "frame.png")
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(image)
    store, labels = LabelStore(str(tmp_path / "store")), []
    for part in range(2):
        rows = []
        for i in range(32):
            label = np.full((height, width), 255, np.uint8)
            label[200:500, 100 + 10 * i:900] = (part * 32 + i) % 19  # a selected region
            labels.append(label)
            rows.append({"index": part * 32 + i, "name": f"{part}-{i}", "image": image, "height": height,
                         "width": width, "label": label.tobytes(), "thresholds": [0.9] * 19,
                         "class_pixels": [0] * 19, "class_kept": [0] * 19, "class_correct": None})
        store.write_labels(part, rows, {"config_hash": "h"})
    store.commit({"num_parts": 2, "num_images": 64, "config_hash": "h"})
    raw = 64 * height * width

    tracemalloc.start()
    load, size = streams.pseudo_labelled(store.uri)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert size == 64 and held < raw / 50, (held, raw)
    assert peak < raw / 2, (peak, raw)  # about one row group's raw labels
    for i in (0, 17, 63):
        assert np.array_equal(load(i)[1], labels[i])


class _HostViews:
    """The former final step of HIAST's views: both normalised on the host, int64 labels."""

    def __init__(self, strong):
        self.strong = strong

    def __call__(self, image, label, rng):
        return normalize(image), normalize(self.strong(image, rng)), torch.from_numpy(label.astype(np.int64))


@pytest.mark.parametrize("two_views", [False, True])
def test_the_model_gets_the_float_input_of_normalising_on_the_host(two_views):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 80, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (40, 80), dtype=np.uint8)
    transform = (weak_strong_transform if two_views else train_transform)((20, 40), (16, 32))
    *steps, last = transform.transforms
    host = Compose([*steps, _HostViews(last.strong) if two_views else Normalize()])
    expected = host(image, label, np.random.default_rng(7))
    sample = transform(image, label, np.random.default_rng(7))
    assert [t.dtype for t in sample] == [torch.uint8] * len(sample)
    batch = [model_input(torch.stack([t, t])) for t in sample]  # a batch of two, as the loader stacks
    for got, want in zip(batch, expected, strict=True):
        assert got.dtype == want.dtype and got.shape[1:] == want.shape
        torch.testing.assert_close(got[1], want)
