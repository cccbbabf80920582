"""HessianOperator and surfaces under torch.distributed (2 gloo processes on the CPU) against
one process on the whole data."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

CE = nn.functional.cross_entropy


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 6 * 6, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (30,), generator=g)
    return model, x, y


def measure(model, batches, full):
    from landscape import HessianOperator, hessian_trace, random_directions, surface_2d, top_eigenvalues

    op = HessianOperator(model, CE, batches)
    V = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return {"hv": op.matmat(V), "grad": op.gradient()[0],
            "trace": torch.tensor(hessian_trace(op, 12, method="hutch++", seed=3).value),
            "eig": torch.tensor(top_eigenvalues(op, k=2, tol=1e-8, seed=0).eigenvalues),
            # surfaces split the grid points across ranks; every rank evaluates them on the whole data
            "surface": torch.from_numpy(surface_2d(model, CE, full, random_directions(model, 2, seed=0),
                                                   steps=3, chunk_size=1).loss)}


def _worker(rank, world, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model, x, y = setup()
        # uneven shards (17 and 13 samples) in batches of different sizes: weights must follow counts
        idx = torch.arange(0, 17) if rank == 0 else torch.arange(17, 30)
        xs, ys = x[idx], y[idx]
        batches = [(xs[:10], ys[:10]), (xs[10:], ys[10:])]
        res = measure(model, batches, (x, y))
        flat = torch.cat([v.reshape(-1) for v in res.values()])
        both = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(both, flat)
        if rank == 0:
            torch.save({"res": res, "both": torch.stack(both)}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see dnq_landscape_common.distributed.exit_distributed


def test_two_ranks_match_one_process(tmp_path):
    out = tmp_path / "res.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    assert torch.equal(got["both"][0], got["both"][1])  # every rank has the same answer
    model, x, y = setup()
    ref = measure(model, [(x[:16], y[:16]), (x[16:], y[16:])], (x, y))
    for k, v in ref.items():
        torch.testing.assert_close(got["res"][k], v, rtol=1e-5, atol=1e-10, msg=k)
