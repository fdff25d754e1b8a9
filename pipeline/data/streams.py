"""Endless, resumable streams of training batches, one per training worker.

Position ``k`` of a worker's stream is a function of (seed, worker rank, k) only, so a
run resumed from step s continues exactly where it stopped, and workers read disjoint
shards of every epoch.
"""

from __future__ import annotations

import zlib
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from pipeline import distributed
from pipeline.data.datasets import Sample, load_image, load_label
from pipeline.data.transforms import train_transform, weak_strong_transform
from pipeline.label_store import LabelStore, decode_label
from pipeline.labels import IGNORE_INDEX

Load = Callable[[int], tuple]  # index -> (image, label) arrays


class SampleStream(torch.utils.data.Dataset):
    """Position ``k`` of this worker's endless sample stream -> transformed sample.

    The global position g = k * world + rank walks epochs of a seeded permutation, so
    workers see disjoint shards of every epoch and the stream resumes exactly from a step.
    A ``sharded`` source holds this worker's own rows only (a label store's, see
    ``shard``): position k walks epochs of those. Either way g seeds the augmentation.
    """

    def __init__(self, load: Load, size: int, transform, seed: int, rank: int, world: int, sharded: bool = False):
        self.load, self.size, self.transform = load, size, transform
        self.seed, self.rank, self.world, self.sharded = seed, rank, world, sharded

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int):
        g = k * self.world + self.rank
        epoch, pos = divmod(k if self.sharded else g, self.size)
        index = int(np.random.default_rng([self.seed, epoch]).permutation(self.size)[pos])
        image, label = self.load(index)
        return self.transform(image, label, np.random.default_rng([self.seed, g, 1]))


class StartAt(torch.utils.data.Sampler):
    """Positions start, start + 1, ... (a resumed stream skips nothing it has not seen)."""

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

    def __init__(self, load: Load, budget_mb: float):
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


def labelled(samples: list[Sample]) -> tuple[Load, int]:
    def load(i: int):
        return load_image(samples[i].image), load_label(samples[i].label)

    return load, len(samples)


def unlabelled(samples: list[Sample]) -> tuple[Load, int]:
    """Images only: every label pixel is ignored."""
    def load(i: int):
        image = load_image(samples[i].image)
        return image, np.full(image.shape[:2], IGNORE_INDEX, np.uint8)

    return load, len(samples)


def labels_if_present(samples: list[Sample]) -> tuple[Load, int]:
    """Images with their labels where the split has them (ignored pixels otherwise): for
    statistics of a method that does not learn from them (STvM on the benchmark)."""
    images_only, size = unlabelled(samples)

    def load(i: int):
        return (load_image(samples[i].image), load_label(samples[i].label)) if samples[i].label else images_only(i)

    return load, size


def shard(store: LabelStore) -> range:
    """The rows of a label store this training worker trains on, the only ones it reads: a
    contiguous block of the canonical order (a few row groups of a few parts), one per
    rank (DistributedSampler's split, without its reshuffle across ranks each epoch)."""
    rank, world, size = distributed.rank(), distributed.world_size(), store.manifest()["num_images"]
    return range(rank * size // world, (rank + 1) * size // world)


def held_label(label: bytes) -> bytes:
    """A label as a training worker holds it: zlib level 1, a few KB and ~2 ms a label
    against 1.2 MB raw at 1536x768 (a worker's shard of a full-size round would otherwise
    hold gigabytes); ``zlib.decompress`` gives it back."""
    return zlib.compress(label, 1)


def pseudo_labelled(store_uri: str) -> tuple[Load, int]:
    """This worker's shard of a label store (see ``shard``): give ``batches`` sharded=True."""
    store = LabelStore(store_uri)
    rows = shard(store)
    if not rows:
        raise ValueError(f"label store {store_uri} holds {store.manifest()['num_images']} images, fewer than the "
                         f"{distributed.world_size()} training workers: lower num_workers")
    rows = [{**row, "label": held_label(row["label"])}
            for group in store.iter_labels(columns=["image", "label", "height", "width"], rows=rows)
            for row in group.to_pylist()]

    def load(i: int):
        row = rows[i]
        label = decode_label({**row, "label": zlib.decompress(row["label"])})
        image = load_image(row["image"])
        # Labels live at the pseudo-label size (e.g. 1280x640); the image keeps its own
        # (2048x1024), so the crop heights of §5 mean what they say: the label is enlarged,
        # nearest neighbour, as the released code does.
        if image.shape[:2] != label.shape:
            label = np.asarray(Image.fromarray(label).resize(image.shape[1::-1], Image.NEAREST))
        return image, label

    return load, len(rows)


def batches(source: tuple[Load, int], crop_heights, cfg, start: int, salt: int, two_views: bool = False,
            first=(), sharded: bool = False) -> Iterator[list[torch.Tensor]]:
    """This worker's batches of uint8 (image, label), or of (weak, strong, label) with
    ``two_views`` (transforms.model_input normalises them on the device), from step
    ``start`` on. ``first``: transforms applied to the loaded sample before the
    augmentation; ``salt`` tells two streams of one stage apart; ``sharded``: the source
    holds this worker's rows only. ``cfg``: a pipeline.train.TrainConfig (batch size,
    crop size, seed, loader settings)."""
    load, size = source
    if cfg.decoded_cache_mb > 0:
        load = DecodedCache(load, cfg.decoded_cache_mb)
    rank, world = distributed.rank(), distributed.world_size()
    make = weak_strong_transform if two_views else train_transform
    transform = make(tuple(crop_heights), (cfg.crop_size[1], cfg.crop_size[0]), first=first)
    dataset = SampleStream(load, size, transform, cfg.seed + salt, rank, world, sharded)
    per_worker = cfg.batch_size // world
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=per_worker,
        sampler=StartAt(start * per_worker),
        num_workers=cfg.loader_workers,
        pin_memory=cfg.use_gpu,
        persistent_workers=cfg.loader_workers > 0,
        prefetch_factor=4 if cfg.loader_workers > 0 else None,
    )
    return iter(loader)
