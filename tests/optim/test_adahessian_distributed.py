"""Distributed AdaHessian: 2 processes on gloo (loopback, via a file store) must take the same
steps as one process on the whole batch, because gradients and the signed z * Hz are averaged
across ranks before the absolute value and the probes come from rank 0's generator."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from meanwise.optim import AdaHessian
from tests.optim._models import loss_of, make

N_STEPS = 12


def _data():
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(16, 1, 6, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (16,), generator=g),
        )
        for _ in range(N_STEPS)
    ]


def _train(model, opt, data, rank=None, world=1):
    for x, y in data:
        if rank is not None:
            half = x.shape[0] // world
            x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        opt.zero_grad()
        loss_of(model, (x, y)).backward(create_graph=opt.hessian_due)
        opt.step()


def _worker(rank, world, store_path, out_path):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = make("conv")
        # A different seed on rank 1: the optimizer must hand it rank 0's probes.
        generator = torch.Generator().manual_seed(5 if rank == 0 else 99)
        opt = AdaHessian(
            model.parameters(),
            lr=0.05,
            update_each=2,
            n_samples=2,
            weight_decay=1e-3,
            generator=generator,
        )
        assert opt.distributed
        _train(model, opt, _data(), rank=rank, world=world)
        if rank == 0:
            torch.save([p.detach() for p in model.parameters()], out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_ranks_equal_one_big_batch(tmp_path):
    out_path = str(tmp_path / "params.pt")
    store = str(tmp_path / "store")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(2, store, out_path), nprocs=2, join=True)
    distributed = torch.load(out_path, weights_only=True)

    model = make("conv")
    opt = AdaHessian(
        model.parameters(),
        lr=0.05,
        update_each=2,
        n_samples=2,
        weight_decay=1e-3,
        generator=torch.Generator().manual_seed(5),
        distributed=False,
    )
    _train(model, opt, _data())
    for got, want in zip(distributed, model.parameters(), strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-9, atol=1e-11)
