"""The trainer, the quantizers, the noise statistics and reconstruction on each device (the
``device`` fixture): the CPU variants run in CI with the same assertions as the CUDA ones, which
``pytest -m cuda`` (scripts/gpu_check.sh) runs on a GPU machine.

Honest comparisons: TF32 is off in every test (a Hopper GPU would otherwise run float32
convolutions at ~1e-3 relative precision); quantizers are compared by their ranges and
quantized weights, and quantized predictions by argmax agreement, never 4-bit logits at a
tight tolerance (rounding flips on 1e-6 input differences). Where CUDA is compared with the
CPU, the CPU variant compares with an independent reference (float64, or a second path) at
the same tolerance. The CPU variants use 8x8 images (the CNNs pool globally) and fewer cases
where tests/dnq/test_train.py and tests/dnq/test_gpu_paths.py cover the rest on the CPU."""

import contextlib
import copy
import json
import math
import os
import warnings

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from dnq.data import BatchLoader, load_dataset, random_crop_flip
from dnq.methods import METHODS, make_method
from dnq.models import build_model
from dnq.noise import QuantNoise
from dnq.quant import quantize
from dnq.train import TrainConfig, make_autocast, train
from tests.conftest import on_devices

SIZE = {"cpu": 8, "cuda": 32}  # image size: the CPU variants run at 8x8 (the CNNs pool globally)


pytestmark = pytest.mark.usefixtures("no_tf32")  # tests/conftest.py


def test_dnq_trains_with_bf16_and_channels_last(tmp_path, device):
    """On CUDA bf16 autocast and channels_last are the defaults; the CPU variant forces them and
    runs the same trainer path (noise, SWA, checkpoint) end to end."""
    data = "synthetic:10:2048" if device == "cuda" else "synthetic:10:256:8"
    forced = {} if device == "cuda" else {"amp": True, "channels_last": True}
    out = tmp_path / "run"
    res = train(TrainConfig(data=data, model="resnet20", method="dnq", epochs=2, batch_size=256 if device == "cuda"
                            else 64, out=str(out), swa_start=0.5, device=device, **forced), quiet=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved_device"].startswith(device) and cfg["amp"] is True and cfg["channels_last"] is True
    assert res["test_loss"] == res["test_loss"]
    blob = torch.load(out / "model.pt", weights_only=True)
    assert all(v.device.type == "cpu" for v in blob["model"].values())


# every method learns digits on the CPU in tests/dnq/test_train.py (15 epochs, > 85%): dnq only here
@pytest.mark.parametrize("device, method", on_devices(["dnq"], METHODS), indirect=["device"])
def test_every_method_learns_digits(tmp_path, device, method):
    res = train(TrainConfig(data="digits", model="cnn-digits", method=method, epochs=3, out=str(tmp_path / method),
                            device=device), quiet=True)
    assert res["test_acc"] > 0.5


_HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def _no_host_sync(device):
    """On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` raises on a device-to-host
    synchronization. The CPU has none to catch, so there the calls that would make one on a GPU
    (``.item()``, ``float(t)``, ``bool(t)``, ...) are spied on and listed in the list yielded."""
    reads: list[str] = []
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield reads
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return
    own = {n: torch.Tensor.__dict__.get(n) for n in _HOST_READS}  # None: inherited from TensorBase

    def spy(name, f):
        def g(*a, **k):
            reads.append(name)
            return f(*a, **k)
        return g

    for n in _HOST_READS:
        setattr(torch.Tensor, n, spy(n, getattr(torch.Tensor, n)))
    try:
        yield reads
    finally:
        for n, f in own.items():
            if f is None:
                delattr(torch.Tensor, n)
            else:
                setattr(torch.Tensor, n, f)


# every method on resnet20 under the host-read spy, and on both models under bf16 + channels_last:
# tests/dnq/test_gpu_paths.py, on the CPU; one case per model here
@pytest.mark.parametrize("device, model_name, method", on_devices(
    [("resnet20", "dnq"), ("vit-tiny", "dnq")], [(m, meth) for m in ("resnet20", "vit-tiny") for meth in METHODS]),
    indirect=["device"])
def test_every_method_steps_without_a_host_sync(device, model_name, method):
    """bf16 autocast + channels_last; after the first (planning) step, a step makes no
    device-to-host synchronization (CUDA: ``set_sync_debug_mode("error")`` raises on one; CPU: no
    host read of a tensor is made, the spy of :func:`_no_host_sync`), and a fixed batch's clean
    loss falls."""
    dev, size = torch.device(device), SIZE[device]
    torch.manual_seed(0)
    model = build_model(model_name, 10, 3, size).to(dev).to(memory_format=torch.channels_last).train()
    ds = load_dataset(f"synthetic:10:64:{size}").to(dev)
    loader = BatchLoader(ds, 16, True, seed=0, channels_last=True)
    calib = ds.calibration_inputs(32).contiguous(memory_format=torch.channels_last)
    m = make_method(method, 4, 4)
    m.setup(model, calib, dev, 0, 0)
    m.on_epoch_start(0, 1.0)
    lr = 0.02 if model_name == "resnet20" else 0.003
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    crit, autocast = nn.CrossEntropyLoss(), make_autocast(dev, True)
    x, y = next(iter(loader))

    def clean_loss():
        if m.uses_noise:
            lam, m.noise.act_lambda = m.noise.act_lambda, 0.0
        with torch.no_grad(), autocast():
            v = float(nn.functional.cross_entropy(model(x).float(), y))
        if m.uses_noise:
            m.noise.act_lambda = lam
        return v

    before = clean_loss()
    losses = torch.zeros(8, device=dev)
    for i in range(8):
        opt.zero_grad(set_to_none=True)
        with _no_host_sync(device) if i > 0 else contextlib.nullcontext([]) as reads:
            loss, _ = m.step(model, x, y, crit, autocast)
            losses[i] = loss
            opt.step()
        assert reads == [], (i, reads)
    assert torch.isfinite(losses).all()
    assert clean_loss() < before
    if m.uses_noise:
        assert all(torch.isfinite(v).all() for v in m.noise.w_var.values())
        assert all(v == v for v in m.noise.a_var.values())


@pytest.mark.parametrize("method", ["dnq"])  # sgd and sam: tests/dnq/test_gpu_paths.py (aot_eager, CPU)
def test_compiled_step_has_no_graph_break(device, method):
    """One graph for two epochs (a new lambda), no graph break, no recompile: inductor and resnet20
    on CUDA. The CPU variant compiles cnn-digits with ``aot_eager``: graphs, graph breaks and
    recompiles are dynamo's and AOTAutograd's, whatever the backend or the depth of the model
    (inductor's C++ build and resnet20's trace would cost a minute on a CPU; tests/dnq/test_train.py
    runs inductor end to end, tests/dnq/test_gpu_paths.py traces resnet20)."""
    dev, size = torch.device(device), SIZE[device]
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = build_model("resnet20" if device == "cuda" else "cnn-digits", 10, 3, size).to(dev)
    model = model.to(memory_format=torch.channels_last).train()
    n = 64 if device == "cuda" else 16
    x = torch.randn(n, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (n,), device=dev)
    m = make_method(method, 4, 4)
    m.setup(model, x, dev, 0, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    net = torch.compile(model, backend="inductor" if device == "cuda" else "aot_eager")
    for epoch, lam in ((0, 0.5), (1, 1.0)):
        m.on_epoch_start(epoch, lam)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            m.step(net, x, y, nn.CrossEntropyLoss(), make_autocast(dev, True))
            opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]


def test_quantizers_match_a_reference(device):
    """Same ranges and quantized weights (up to float rounding of the scales), and the quantized
    models agree on >= 99% of the predictions. CUDA: against the CPU's. CPU: against the same
    model quantized in float64 (an independent evaluation of the same ranges and grids)."""
    torch.manual_seed(0)
    size = SIZE[device]
    model = build_model("resnet20", 10, 3, size).eval()
    calib, x = torch.randn(64, 3, size, size), torch.randn(512, 3, size, size)
    ref_dtype = torch.float32 if device == "cuda" else torch.float64
    q_ref = quantize(copy.deepcopy(model).to(ref_dtype), 4, 4, calib.to(ref_dtype))
    q_dev = quantize(model.to(device), 4, 4, calib.to(device))
    for a, b in zip(q_ref.ptq_layers, q_dev.ptq_layers):
        assert a["layer"] == b["layer"] and (a["wbits"], a["abits"]) == (b["wbits"], b["abits"])
        assert b["act_lo"] == pytest.approx(a["act_lo"], rel=1e-5, abs=1e-6)
        assert b["act_hi"] == pytest.approx(a["act_hi"], rel=1e-5, abs=1e-6)
    for (n, wa), (_, wb) in zip(q_ref.named_parameters(), q_dev.named_parameters()):
        if n.endswith("weight") and wa.dim() > 1:
            diff = (wb.cpu().double() - wa.double()).abs()
            step = wa.double().abs().amax(dim=tuple(range(1, wa.dim())), keepdim=True) / 7  # one 4-bit step
            assert float((diff > 1e-4 * step).float().mean()) < 1e-3, n  # grids agree (rare tie flips allowed)
    with torch.no_grad():
        agree = (q_dev(x.to(device)).argmax(1).cpu() == q_ref(x.to(ref_dtype)).argmax(1)).float().mean()
    assert float(agree) >= 0.99


def test_augmentation_runs_on_the_device(device):
    """The batched crop-and-flip stays on the device, is reproducible from the generator's seed,
    and gives each image one of its own padded crops, flipped or not (checked against every
    candidate)."""
    ds = load_dataset("synthetic:10:64").to(device)
    x, pad = ds.x_train, 4
    out = random_crop_flip(x, torch.Generator(device=device).manual_seed(0), pad)
    assert out.device.type == device and out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, random_crop_flip(x, torch.Generator(device=device).manual_seed(0), pad))
    n, c, h, w = x.shape
    xp = nn.functional.pad(x, (pad,) * 4)
    crops = torch.stack([xp[:, :, i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)], 1)
    crops = torch.cat([crops, crops.flip(-1)], 1)
    assert (crops == out[:, None]).flatten(2).all(2).any(1).all()
    assert not torch.equal(out, x)  # it did crop or flip


def test_noise_statistics_ignore_the_device_and_an_outer_autocast(device):
    """The statistics on the device under a bf16 autocast equal the CPU's without one; on the CPU
    this compares the autocast path with the plain one."""
    torch.manual_seed(0)
    model = build_model("cnn-digits", 10, 1, 8)
    calib = torch.randn(64, 1, 8, 8)
    a = QuantNoise(model, 4, 4)
    a.update(calib)
    b = QuantNoise(copy.deepcopy(model).to(device), 4, 4)
    with torch.autocast(device, dtype=torch.bfloat16):  # the statistics ignore an outer autocast
        b.update(calib.to(device))
    for n in a.w_var:
        torch.testing.assert_close(b.w_var[n].cpu(), a.w_var[n], rtol=1e-4, atol=1e-9)
    for n in a.a_var:
        assert abs(b.a_var[n] - a.a_var[n]) <= 1e-4 * a.a_var[n] + 1e-9


@contextlib.contextmanager
def _deterministic():
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def test_reconstruction_streams_its_cache_and_matches_the_reference_ranges(device, monkeypatch):
    """QDrop: the cache kept on the device and streamed from (on CUDA, pinned) host memory give the
    same quantized model; the initial step sizes equal the reference's (same float model, same
    images): CUDA against the CPU, the CPU against float64. The CPU variant runs the same code
    (``device_budget=0`` streams every cached tensor there too, unpinned) in deterministic mode.

    Under ``torch.use_deterministic_algorithms(True)``: CUDA's default kernels (atomic adds in the
    backward) differ from run to run. cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` then; set it
    before the run (``CUBLAS_WORKSPACE_CONFIG=:4096:8 pytest -m cuda``; scripts/gpu_check.py does),
    it is set here only if missing."""
    from dnq.recon import reconstruct

    if device == "cuda" and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    size, n, iters = (32, 128, 10) if device == "cuda" else (8, 64, 4)
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, size).eval()
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    ref_dtype = torch.float32 if device == "cuda" else torch.float64
    kw = dict(batch_size=16, act_lr=0.0, weight_lr=0.0)
    with warnings.catch_warnings(), _deterministic():
        warnings.simplefilter("ignore")
        dev_model = copy.deepcopy(model).to(device)
        full = reconstruct(dev_model, 4, 4, x.to(device), "qdrop", iters=iters, batch_size=16)
        streamed = reconstruct(dev_model, 4, 4, x.to(device), "qdrop", iters=iters, batch_size=16, device_budget=0)
        ref = reconstruct(copy.deepcopy(model).to(ref_dtype), 4, 4, x.to(ref_dtype), "qdrop", iters=1, **kw)
        dev = reconstruct(dev_model, 4, 4, x.to(device), "qdrop", iters=1, **kw)
    assert all(u["streamed"] == [] for u in full.ptq_recon["units"])
    assert all(set(u["streamed"]) == {"qx", "fy"} for u in streamed.ptq_recon["units"])
    assert all(torch.equal(v, streamed.state_dict()[k]) for k, v in full.state_dict().items())
    assert len(ref.ptq_layers) == len(dev.ptq_layers)
    for a, b in zip(ref.ptq_layers, dev.ptq_layers):
        assert math.isfinite(b["act_scale"]) and a["act_scale"] == pytest.approx(b["act_scale"], rel=1e-4)
