"""Whether a training stage's per-GPU batch fits its GPU, known before anything starts.

The estimate runs the model's own code on PyTorch's meta device (shapes, no data, no
GPU): a whole step, forward, loss and backward, with fp16 activations standing in for
autocast, tracking every tensor's storage until its last reference dies; the peak is the
activation memory. To it come the fp32 weights, their gradients and Adam's two states
(and an EMA teacher's weights), DDP's gradient buckets with several workers, and a
reserve for the CUDA context, cuDNN's workspace and fragmentation, which the meta device
cannot see. The GPU check (benchmarks/gpu_check.py) measures the same steps on a real
GPU. ``python benchmarks/estimate_memory.py`` prints the estimates of the shipped configs.

Estimated (not measured) for DeepLab-v2 ResNet-101 at 1024x512 with AMP: 16.2 GiB at 8
images per GPU (IAST), 17.0 GiB (HIAST), about 8.7 GiB at 4 and 4.9 GiB at 2, plus the
reserve. A V100-16GB has 15.78 GiB, a V100-32GB 31.75 GiB.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# CUDA context (~0.3-0.5 GiB), cuDNN workspace and the caching allocator's fragmentation:
# what the meta device does not see.
RESERVE_GIB = 1.0
GIB = 2**30


class _PeakTracker(TorchDispatchMode):
    """Live bytes of every storage an op creates (or autograd saves), and their peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.current = self.peak = 0

    def track(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self.live:
            self.live[key] = [t.untyped_storage().nbytes(), 0]
            self.current += self.live[key][0]
            self.peak = max(self.peak, self.current)
        self.live[key][1] += 1
        weakref.finalize(t, self._release, key)
        return t

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


@functools.lru_cache(maxsize=None)
def activation_gib(arch: str, batch: int, crop_size: tuple[int, int], teacher: bool, amp: bool) -> float:
    """Peak activation memory (GiB) of one training step at ``batch`` images of
    ``crop_size`` (width, height): the student's forward, IAST's region-guided loss (and
    a no-grad teacher forward with its consistency term), the backward."""
    from pipeline.models import build_model

    dtype = torch.float16 if amp else torch.float32
    with torch.device("meta"):
        student = build_model(arch, 19).to(dtype).train()
        extra = build_model(arch, 19).to(dtype).eval().requires_grad_(False) if teacher else None
    w, h = crop_size
    tracker = _PeakTracker()
    x = torch.empty(batch, 3, h, w, device="meta", dtype=dtype)
    y = torch.zeros(batch, h, w, device="meta", dtype=torch.long)
    with tracker, torch.autograd.graph.saved_tensors_hooks(tracker.track, lambda t: t):
        logp = F.log_softmax(student(x).float(), 1)
        labelled = y != 255
        loss = F.nll_loss(logp, y, ignore_index=255) + (-logp.sum(1) * labelled).mean()
        loss = loss + (-(logp.exp() * logp).sum(1) * ~labelled).mean()
        if extra is not None:
            with torch.no_grad():
                probs = extra(x).float().softmax(1)
            loss = loss + (-(probs * logp).sum(1) * ~labelled).mean()
        loss.backward()
    return tracker.peak / GIB


def _parameters(arch: str) -> int:
    from pipeline.models import build_model

    with torch.device("meta"):
        return sum(p.numel() for p in build_model(arch, 19).parameters())


def train_step_gib(cfg) -> dict[str, float]:
    """The estimate for a pipeline.train.TrainConfig, per GPU, in GiB: its parts and the
    ``total``. The activations are measured at 1 and 2 images and extended linearly (they
    are linear in the batch: 1.95 GiB an image at 1024x512 in fp16)."""
    per_gpu = cfg.batch_size // cfg.num_workers
    teacher = cfg.stage == "stvm" or cfg.teacher_momentum is not None
    amp = bool(cfg.amp)  # the estimate is for the GPU the config asks for, where amp applies
    one, two = (activation_gib(cfg.arch, n, tuple(cfg.crop_size), teacher, amp) for n in (1, 2))
    activations = one + (two - one) * (per_gpu - 1)
    params = _parameters(cfg.arch) * 4 / GIB  # fp32
    static = params * 4 + (params if teacher else 0)  # weights, gradients, Adam's 2 states; teacher
    buckets = params if cfg.num_workers > 1 else 0  # DDP's gradient buckets
    parts = {"per_gpu_batch": per_gpu, "static": static, "activations": activations, "ddp_buckets": buckets,
             "reserve": RESERVE_GIB}
    parts["total"] = static + activations + buckets + RESERVE_GIB
    return parts


def check_fits(stage: str, cfg, gpu_memory_gb: float) -> None:
    """Raise ValueError, with the numbers and the fix, when the stage's per-GPU batch
    does not fit ``gpu_memory_gb`` (GiB per GPU, as torch reports it)."""
    est = train_step_gib(cfg)
    if est["total"] <= gpu_memory_gb:
        return
    more = [n for n in range(cfg.num_workers + 1, cfg.batch_size + 1) if cfg.batch_size % n == 0
            and train_step_gib(dataclasses.replace(cfg, num_workers=n))["total"] <= gpu_memory_gb]
    advice = (f"set compute.num_workers to {more[0]} or more (global batch {cfg.batch_size} split over more "
              "GPUs, SyncBatchNorm across them)" if more else "use GPUs with more memory")
    raise ValueError(
        f"{stage}: {est['per_gpu_batch']} image(s) of {cfg.crop_size[0]}x{cfg.crop_size[1]} per GPU need about "
        f"{est['total']:.1f} GiB (estimated: {est['static']:.2f} weights/gradients/Adam, {est['activations']:.2f} "
        f"activations, {est['ddp_buckets']:.2f} DDP buckets, {est['reserve']:.1f} CUDA context and workspace), "
        f"more than compute.gpu_memory_gb {gpu_memory_gb}: {advice}, or a smaller batch_size"
    )
