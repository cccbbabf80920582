import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CIFAR_NPZ = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def run_dnq(*args, timeout=600, check=True, **kw):
    """Run ``python -m dnq ARGS`` in a subprocess; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "dnq", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=kw.pop("cwd", None))
    if check and p.returncode != 0:
        raise AssertionError(f"dnq {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture
def tiny_cnn():
    """A small CNN with BatchNorm whose statistics are not the defaults (eval mode)."""
    torch.manual_seed(0)
    from dnq.models import build_model

    model = build_model("cnn-digits", 10, 1, 8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


class UntraceableConvBN(torch.nn.Module):
    """Conv + BatchNorm behind data-dependent control flow, which torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.bn(self.conv(x)).flatten(1)
