import os

import torch
import torch.multiprocessing as mp

from pipeline import distributed


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        bn = torch.nn.BatchNorm2d(3)
        bn.running_mean.fill_(float(rank + 1))  # each rank's statistics after its own last batch
        bn.num_batches_tracked.fill_(10 + rank)
        distributed.broadcast_buffers(bn)
        torch.save({k: v.clone() for k, v in bn.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_broadcast_buffers_gives_every_rank_rank_zeros_statistics(tmp_path):
    port = 29500 + os.getpid() % 1000
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for state in states:
        assert torch.equal(state["running_mean"], torch.ones(3))
        assert int(state["num_batches_tracked"]) == 10


def test_collectives_are_no_ops_in_a_single_process():
    bn = torch.nn.BatchNorm2d(2)
    bn.running_mean.fill_(3.0)
    distributed.broadcast_buffers(bn)
    assert torch.equal(bn.running_mean, torch.full((2,), 3.0))
    assert distributed.world_size() == 1 and distributed.rank() == 0


def _sync_bn_worker(rank: int, port: int, out: str) -> None:
    """Each of two ranks normalises its half of one batch with GlooSyncBatchNorm."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        x = torch.randn(4, 3, 5, 6) * 3 + 2
        model = distributed.sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), torch.device("cpu"))
        bn = model[0]
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
            bn.bias.copy_(torch.tensor([0.0, -1.0, 1.0]))
        half = x[2 * rank:2 * rank + 2].clone().requires_grad_(True)
        y = model(half)
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()  # a loss that weights every output
        torch.save({"type": type(bn).__name__, "y": y.detach(), "grad_x": half.grad, "grad_w": bn.weight.grad,
                    "running_mean": bn.running_mean, "running_var": bn.running_var},
                   os.path.join(out, f"sync{rank}.pt"))
        # Both ranks reach the teardown together: gloo aborts a rank ("terminate called
        # without an active exception") that destroys the group while the other is still in it.
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_sync_batchnorm_on_two_gloo_workers_equals_one_batch_norm_over_both_batches(tmp_path):
    port = 29600 + os.getpid() % 1000
    mp.spawn(_sync_bn_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"sync{r}.pt") for r in range(2)]
    assert ranks[0]["type"] == "GlooSyncBatchNorm"

    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 6) * 3 + 2).requires_grad_(True)
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 1.0]))
    y = bn(x)
    weights = torch.cat([torch.arange(y[:2].numel()).view_as(y[:2])] * 2)  # each rank's loss weights
    (y * weights).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in ranks]), x.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ranks[0]["grad_w"] + ranks[1]["grad_w"], bn.weight.grad, atol=1e-3, rtol=1e-4)
    for r in ranks:  # the running statistics of the whole batch, on both ranks
        torch.testing.assert_close(r["running_mean"], bn.running_mean)
        torch.testing.assert_close(r["running_var"], bn.running_var)
