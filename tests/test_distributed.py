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
