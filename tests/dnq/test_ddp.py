"""DistributedDataParallel on the CPU with the gloo backend (2 processes)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import ROOT, run_dnq

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def torchrun(*args, nproc=2):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        "-m", "dnq", *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def _weights(path):
    return torch.load(path / "model.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_two_processes_match_one_process_without_batchnorm(tmp_path):
    # mlp-digits has no BatchNorm, and the weight noise is one draw shared by all ranks, so the
    # all-reduced gradient of two half-batches equals the one-process gradient of the whole batch.
    args = ["train", "--data", "digits", "--model", "mlp-digits", "--method", "dnq-w", "--epochs", "3",
            "--batch-size", "64", "--quiet", "--seed", "1"]
    torchrun(*args, "--out", tmp_path / "ddp")
    run_dnq(*args, "--out", tmp_path / "single")
    a, b = _weights(tmp_path / "ddp"), _weights(tmp_path / "single")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    ma = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert len(ma) == 4 and ma[-1]["final"]  # rank 0 alone wrote: 3 epochs and the final line
    for ra, rb in zip(ma[:3], mb[:3]):
        assert abs(ra["val_acc"] - rb["val_acc"]) < 1e-9 and abs(ra["train_loss"] - rb["train_loss"]) < 1e-5
    assert abs(ma[-1]["test_acc"] - mb[-1]["test_acc"]) < 1e-9


@pytest.mark.slow
def test_dnq_trains_under_torchrun_with_the_single_process_statistics(tmp_path):
    args = ["train", "--data", "digits", "--model", "cnn-digits", "--method", "dnq", "--epochs", "6",
            "--batch-size", "64", "--quiet"]
    torchrun(*args, "--out", tmp_path / "ddp")
    run_dnq(*args, "--epochs", "1", "--out", tmp_path / "single")
    ma = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    mb = json.loads((tmp_path / "single" / "metrics.jsonl").read_text().splitlines()[0])
    assert ma[-1]["test_acc"] > 0.8
    # epoch-0 statistics come from the same initial weights and calibration data
    for kind in ("weight", "act"):
        for layer, st in mb["noise"][kind].items():
            for key in ("mu", "sigma"):
                assert abs(ma[0]["noise"][kind][layer][key] - st[key]) <= 1e-6 * (1 + abs(st[key]))
    files = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert files == ["checkpoint.pt", "config.json", "metrics.jsonl", "model.pt", "result.json"]
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2


def _stats_worker(rank, world, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from dnq.models import build_model
        from dnq.noise import QuantNoise

        torch.manual_seed(rank)  # different weights and data on every rank on purpose
        model = build_model("cnn-digits", 10, 1, 8)
        noise = QuantNoise(model, 3, 3)
        noise.update(torch.randn(32, 1, 8, 8))
        flat = noise._flat()
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            torch.save(torch.stack(gathered), out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip C++ static destruction, which sometimes aborts after gloo + oneDNN (see dnq.cli)


def test_noise_statistics_are_identical_on_every_rank(tmp_path):
    out = tmp_path / "stats.pt"
    mp.spawn(_stats_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    stats = torch.load(out, weights_only=True)
    assert stats.shape[0] == 2 and stats[0].numel() > 100
    assert torch.equal(stats[0], stats[1])
