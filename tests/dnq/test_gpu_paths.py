"""The CUDA code paths, run on the CPU: bf16 autocast, channels_last and ``torch.compile`` are
forced here (``--amp``, ``--channels-last``, ``--compile``), so what a GPU user runs is tested on
every machine. Issue 8: DNQ crashed at its first bf16 step; these tests would have caught it."""

import contextlib
import math

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from dnq.data import BatchLoader, load_dataset
from dnq.methods import METHODS, make_method
from dnq.models import build_model
from dnq.noise import QuantNoise
from dnq.train import make_autocast
from tests.conftest import HostReads

CPU = torch.device("cpu")
LR = {"resnet20": 0.02, "vit-tiny": 0.003}
MODES = {
    "amp": dict(amp=True, channels_last=False, compile=None),
    "channels-last": dict(amp=False, channels_last=True, compile=None),
    "amp+channels-last": dict(amp=True, channels_last=True, compile=None),
}


def _setup(model_name, method_name, amp, channels_last, seed=0, lam=1.0):
    torch.manual_seed(seed)
    model = build_model(model_name, 10, 3, 32).train()
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    calib = torch.randn(32, 3, 32, 32, generator=g)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x, calib = x.contiguous(memory_format=torch.channels_last), calib.contiguous(memory_format=torch.channels_last)
    method = make_method(method_name, wbits=4, abits=4)
    method.setup(model, calib, CPU, seed, 0)
    method.on_epoch_start(0, lam)
    opt = torch.optim.SGD(model.parameters(), lr=LR[model_name], momentum=0.9)
    return model, method, opt, x, y, make_autocast(CPU, amp)


def _clean_loss(model, method, x, y, autocast):
    """The loss on the batch without noise (train-mode BatchNorm, as in training)."""
    lam = None
    if method.uses_noise:
        lam, method.noise.act_lambda = method.noise.act_lambda, 0.0
    with torch.no_grad(), autocast():
        loss = nn.functional.cross_entropy(model(x).float(), y)
    if lam is not None:
        method.noise.act_lambda = lam
    return float(loss)


def _train_steps(model, method, opt, x, y, autocast, net=None, steps=6):
    crit = nn.CrossEntropyLoss()
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss, logits = method.step(model if net is None else net, x, y, crit, autocast)
        opt.step()
        losses.append(float(loss))
        assert logits.shape == (len(y), 10)
    return losses


def _assert_finite_noise(method):
    if not method.uses_noise:
        return
    noise = method.noise
    for d in (noise.w_mean, noise.w_var):
        for v in d.values():
            assert v.dtype == torch.float32 and torch.isfinite(v).all()
    for d in (noise.a_mean, noise.a_var):
        assert all(math.isfinite(v) for v in d.values())
    assert noise.w_var or noise.a_var


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("method_name", METHODS)
@pytest.mark.parametrize("model_name", ["resnet20", "vit-tiny"])
def test_every_method_trains_under_cuda_settings_on_the_cpu(model_name, method_name, mode):
    opts = MODES[mode]
    model, method, opt, x, y, autocast = _setup(model_name, method_name, opts["amp"], opts["channels_last"])
    before = _clean_loss(model, method, x, y, autocast)
    losses = _train_steps(model, method, opt, x, y, autocast)
    after = _clean_loss(model, method, x, y, autocast)
    assert all(math.isfinite(v) for v in losses)
    assert after < before, (before, after, losses)
    _assert_finite_noise(method)
    if opts["channels_last"]:
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # the noise kept the layout


def test_issue_8_bf16_channels_last_dnq_forward_regression():
    """The exact sequence of the issue: it raised "Found dtype Float but expected BFloat16"."""
    m = build_model("resnet20", 10, 3, 32).to(memory_format=torch.channels_last)
    calib = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    q = QuantNoise(m, 4, 4).attach()
    q.update(calib)
    q.new_epoch(0)
    q.act_lambda = 1.0
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("sampler", ["fresh", "table"])
def test_noise_hooks_keep_dtype_and_memory_format(sampler):
    """Under autocast the hooks return the activation's dtype (no float32 cast before every
    convolution) and layout, and the injected noise has the planned statistics."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 1)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), conv).train().to(memory_format=torch.channels_last)
    noise = QuantNoise(model, 4, 4, weight=False, rho=1e6, sampler=sampler).attach()  # p == 1: every element
    noise.update(torch.randn(16, 3, 16, 16).contiguous(memory_format=torch.channels_last))
    noise.a_mean["2"], noise.a_var["2"] = 0.25, 0.04
    noise.act_lambda = 2.0
    noise.new_epoch(0)
    seen = {}
    conv.register_forward_pre_hook(lambda m, a: seen.update(before=a[0]), prepend=True)  # before the noise hook
    conv.register_forward_hook(lambda m, a, o: seen.update(after=a[0]))  # the noisy input
    x = torch.randn(64, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    ac = make_autocast(CPU, True)
    for planned in (True, False):
        if planned:
            noise.begin_step(x, ac)
        else:
            noise.begin_step(x[:1], ac)  # another shape: the hooks draw for themselves
        with ac():
            model(x)
        a, b = seen["after"], seen["before"]
        assert a.dtype == b.dtype == torch.bfloat16
        assert a.is_contiguous(memory_format=torch.channels_last)
        d = (a.float() - b.float()).detach()
        assert abs(float(d.mean()) - 0.5) < 0.02 and abs(float(d.std()) - 0.4) < 0.02


def test_noise_statistics_are_float32_whatever_the_autocast():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32)
    calib = torch.randn(32, 3, 32, 32)
    plain = QuantNoise(model, 3, 3)
    plain.update(calib)
    under = QuantNoise(model, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under.update(calib)
    assert plain.a_var == under.a_var and plain.a_mean == under.a_mean
    for n in plain.w_var:
        assert under.w_var[n].dtype == torch.float32 and torch.equal(plain.w_var[n], under.w_var[n])


@pytest.mark.parametrize("method_name", ["sgd", "dnq", "sam"])
def test_compiled_step_has_no_graph_breaks_or_recompiles(method_name):
    """``torch.compile`` traces the whole model with its noise hooks into one graph, and the next
    epoch (new lambda, new statistics, new random numbers) reuses it. AOTAutograd runs (the
    ``aot_eager`` backend: the functionalization inductor sees, without its C++ build time); the
    trainer's ``--compile`` uses inductor (test_train.py runs it end to end)."""
    torch._dynamo.reset()
    counters.clear()
    model, method, opt, x, y, autocast = _setup("resnet20", method_name, True, True)
    net = torch.compile(model, backend="aot_eager")
    before = _clean_loss(model, method, x, y, autocast)
    _train_steps(model, method, opt, x, y, autocast, net=net, steps=2)
    graphs = counters["stats"]["unique_graphs"]
    for epoch, lam in ((1, 0.5), (2, 0.8)):  # lambda ramps: no Python number may be baked in
        method.on_epoch_start(epoch, lam)
        _train_steps(model, method, opt, x, y, autocast, net=net, steps=2)
    after = _clean_loss(model, method, x, y, autocast)
    assert dict(counters["graph_break"]) == {}
    assert graphs == 1 and counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]
    assert after < before


def test_compiled_vit_with_dnq_is_one_graph():
    torch._dynamo.reset()
    counters.clear()
    model, method, opt, x, y, autocast = _setup("vit-tiny", "dnq", True, True)
    net = torch.compile(model, backend="eager")  # dynamo's capture alone: the ViT's AOT trace takes ~30 s here
    before = _clean_loss(model, method, x, y, autocast)
    _train_steps(model, method, opt, x, y, autocast, net=net, steps=3)
    method.on_epoch_start(1, 0.5)
    _train_steps(model, method, opt, x, y, autocast, net=net, steps=3)
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    assert _clean_loss(model, method, x, y, autocast) < before


_HostReads = HostReads  # the spy lives in tests/conftest.py


@pytest.mark.parametrize("method_name", METHODS)
def test_training_step_reads_nothing_back_from_the_device(method_name):
    """A step (batch, augmentation, normalization, noise, forward, backward, optimizer and
    schedule) makes no host read of a tensor and builds no tensor from Python data."""
    ds = load_dataset("synthetic:10:64:32")
    loader = BatchLoader(ds, 16, True, seed=0, channels_last=True)
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32).to(memory_format=torch.channels_last).train()
    method = make_method(method_name, 4, 4)
    method.setup(model, ds.calibration_inputs(32).contiguous(memory_format=torch.channels_last), CPU, 0, 0)
    method.on_epoch_start(0, 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    crit, autocast = nn.CrossEntropyLoss(label_smoothing=0.1), make_autocast(CPU, True)
    losses = torch.zeros(len(loader))
    for i, (x, y) in enumerate(loader):  # the first step plans the noise sites (one extra forward)
        opt.zero_grad(set_to_none=True)
        with _HostReads() if i > 0 else contextlib.nullcontext() as spy:
            loss, _ = method.step(model, x, y, crit, autocast)
            losses[i] = loss
            opt.step()
            sched.step()
        if i > 0:
            assert spy.calls == [], spy.calls
    assert torch.isfinite(losses).all()
