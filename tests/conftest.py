import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CIFAR_NPZ = ROOT.parent / "shared" / "data" / "cifar10-subset.npz"

# torch's threads in the tests: 2 (the development machines' cores), or DNQ_TEST_THREADS (`make test` runs the README
# test beside the rest of the suite, one thread each, so that the two never ask for more threads than there are cores)
TEST_THREADS = int(os.environ.get("DNQ_TEST_THREADS") or min(2, os.cpu_count() or 1))
torch.set_num_threads(TEST_THREADS)


def run_dnq(*args, timeout=600, check=True, **kw):
    """Run ``python -m dnq ARGS`` in a subprocess; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "dnq", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=kw.pop("cwd", None))
    if check and p.returncode != 0:
        raise AssertionError(f"dnq {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA_MARKS)], ids=["cpu", "cuda"])
def device(request):
    """The device a shared test runs on: ``"cpu"`` (in CI) and ``"cuda"`` (marked ``cuda``, skipped
    without a GPU; ``pytest -m cuda`` runs these on a GPU machine). A test that needs other cases per
    device (fewer on the CPU) parametrizes ``device`` indirectly with :func:`on_devices`."""
    return request.param


def on_devices(cpu, cuda):
    """Parameters for ``@pytest.mark.parametrize("device, NAME[, NAME...]", on_devices(...), indirect=["device"])``:
    the cases in ``cpu`` on the CPU and those in ``cuda`` on CUDA (marked like the ``device`` fixture's
    ``"cuda"``); a case is a value, or a tuple of values for several names."""
    out = []
    for dev, cases, marks in (("cpu", cpu, ()), ("cuda", cuda, CUDA_MARKS)):
        for case in cases:
            case = case if isinstance(case, tuple) else (case,)
            out.append(pytest.param(dev, *case, marks=marks, id="-".join(map(str, (dev, *case)))))
    return out


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


class HostReads(contextlib.AbstractContextManager):
    """Counts the calls that read a tensor's value on the host (a device sync on CUDA) and, with
    ``tensor_builds``, the tensors built from Python data (a host-to-device copy on CUDA)."""

    NAMES = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, tensor_builds: bool = True):
        self.calls: list[str] = []
        self.tensor_builds = tensor_builds

    def __enter__(self):
        self.calls = []
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        self.saved_tensor = torch.tensor
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, self._spy(n, f))
        if self.tensor_builds:
            torch.tensor = self._spy("torch.tensor", self.saved_tensor)
        return self

    def _spy(self, name, f):
        def g(*a, **k):
            self.calls.append(name)
            return f(*a, **k)
        return g

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)
        torch.tensor = self.saved_tensor
        return False


@pytest.fixture
def no_tf32():
    """TF32 off for cuDNN and cuBLAS within the test (a CUDA variant compares with float32 or float64)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
