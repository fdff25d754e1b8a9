"""The few collective operations the training loops need, apart from the method code.

They work the same in a single process (no process group: no-ops), under Ray Train's
gloo (CPU) or NCCL (GPU) process group.
"""

from __future__ import annotations

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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)
