"""The few collective operations the training loops need, apart from the method code.

They work the same in a single process (no process group: no-ops), under Ray Train's
gloo (CPU) or NCCL (GPU) process group.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def sum_array(array: np.ndarray, device: torch.device) -> np.ndarray:
    """Element-wise sum of a numpy array over all workers (e.g. confusion matrices)."""
    tensor = torch.as_tensor(array, device=device)
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def average_gradients(module: torch.nn.Module) -> None:
    """Average the gradients of a module that is not wrapped in DDP (the discriminator:
    it takes gradients from two backward passes per step, one of them with its weights
    frozen, which DDP's reducer does not allow)."""
    if not is_distributed():
        return
    n = world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(n)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (batch-norm running statistics) to every worker. DDP
    syncs them at the start of each forward only, so after the last training step every
    rank holds statistics updated by its own batch; evaluating the saved (rank-0) model
    needs rank 0's."""
    if not is_distributed():
        return
    buffers = [b for b in module.buffers() if b.numel()]
    # one collective per dtype, not one per buffer, in the same order on every rank (a set
    # of dtypes iterates in an order that differs between processes)
    for dtype in sorted({b.dtype for b in buffers}, key=str):
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.reshape(-1) for b in group])
        dist.broadcast(flat, src)
        for b, value in zip(group, flat.split([b.numel() for b in group])):
            b.copy_(value.view_as(b))


def no_sync(model: torch.nn.Module):
    """DDP's ``no_sync()`` for a step with two backward passes: the first accumulates its
    gradients locally and the second all-reduces both sums at once, one all-reduce of the
    whole model a step instead of two. Forward and backward must both run inside. A model
    not wrapped in DDP has nothing to skip."""
    skip = getattr(model, "no_sync", None)
    return skip() if skip is not None else nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)



class GlooSyncBatchNorm(torch.nn.BatchNorm2d):
    """Batch norm over every worker's batch together, on the CPU (gloo), where torch's
    SyncBatchNorm does not run (it needs a GPU, and DDP refuses it on a CPU module). The
    per-channel sums go through one autograd-aware all-reduce per layer, so value and
    gradient are those of one batch made of all the workers' batches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.track_running_stats or world_size() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # autograd-aware

        channels = x.shape[1]
        dims = [0, 2, 3]
        local = x.double()
        count = torch.full((1,), x.numel() / channels, dtype=torch.float64)
        stats = all_reduce(torch.cat([local.sum(dims), (local * local).sum(dims), count]))
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            unbiased = var * n / (n - 1).clamp_min(1)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = (1, channels, 1, 1)
        y = ((local - mean.view(shape)) / (var.view(shape) + self.eps).sqrt()).to(x.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Every BatchNorm2d of ``model`` normalising over all workers' batches: torch's
    SyncBatchNorm on a GPU, GlooSyncBatchNorm on the CPU. Parameters and state-dict keys
    are unchanged, so checkpoints load either way and an optimiser built before keeps its
    parameters."""
    if device.type != "cpu":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) is torch.nn.BatchNorm2d:
            module.__class__ = GlooSyncBatchNorm  # forward only differs; no state of its own
    return model
