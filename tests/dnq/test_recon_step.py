"""The reconstruction step (dnq.recon_step, issue 22) on each device (the ``device`` fixture).

* the fused Functions (soft weights + regularizer, LSQ with QDrop's mix, the output error) equal
  the composed formulas of dnq.recon in value, exactly, and in gradient to 1e-12 (float64);
* a steady-state QDrop step of a real resnet20 block (``layers.0``, batch 32) makes at most 120
  aten ops and reads nothing back from the device;
* the same seed gives the same quantized model; a NaN names the unit, the stage and the first
  bad step, found at the next read of the losses;
* the constant hard weights are computed once;
* CUDA only: the replayed graph gives the eager step's result, bit for bit, under
  ``torch.use_deterministic_algorithms(True)``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import warnings

import pytest
import torch

import dnq.recon as recon
import dnq.recon_step as recon_step
from dnq.errors import ReconstructionError
from dnq.models import build_model
from dnq.recon import AdaRoundWeight, lsq_fake_quantize, reconstruct
from dnq.recon_step import UnitStep, lsq_quantize, recon_loss, soft_round
from tests.conftest import ROOT
from tests.dnq.test_gpu_paths import _HostReads

MAX_OPS = 120


pytestmark = pytest.mark.usefixtures("no_tf32")  # tests/conftest.py


@contextlib.contextmanager
def _deterministic(device):
    """``torch.use_deterministic_algorithms(True)`` (cuBLAS needs its workspace setting on CUDA)."""
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if device == "cuda" and env is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        if device == "cuda" and env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _bench_recon():
    """benchmarks/bench_recon.py as a module: its op counter is the one the benchmark's counts use."""
    spec = importlib.util.spec_from_file_location("bench_recon", ROOT / "benchmarks" / "bench_recon.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_Count = _bench_recon()._Count  # a TorchDispatchMode counting every aten op (views and detaches included)


class _Got(Exception):
    pass


def _unit_step(device, unit="layers.0", method="qdrop", stage="joint", *, iters=40, n_calib=64, size=32, seed=0,
               cuda_graph=False, model=None) -> UnitStep:
    """The step of ``unit`` in ``stage`` as :func:`reconstruct` builds it (the units before it not
    reconstructed)."""

    class Grab(UnitStep):
        def run(self, bar=None):
            if self.name.startswith(f"{stage} reconstruction of unit {unit!r}"):
                raise _Got(self)
            self.close()
            return 0

    model = build_model("resnet20", 10, 3, size).eval() if model is None else model
    calib = torch.randn(n_calib, 3, size, size, generator=torch.Generator().manual_seed(0))
    saved = recon.UnitStep
    recon.UnitStep = Grab
    try:
        with pytest.raises(_Got) as got, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reconstruct(model.to(device), 4, 4, calib.to(device), method, iters=iters, batch_size=32, seed=seed,
                        cuda_graph=cuda_graph)
    finally:
        recon.UnitStep = saved
    return got.value.args[0]


# -- the fused Functions against the composed formulas ------------------------------------------
def _weight(device, bits=3, mode="symmetric"):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64) * 0.5).to(device)
    ada = AdaRoundWeight(w, bits, mode, "mse").to(device)  # mse: the outliers clipped
    with torch.no_grad():  # some h clipped at 0 and 1 (|V| large), the rest in between
        ada.v.mul_(3.0)
        ada.v[0].fill_(6.0)
        ada.v[1].fill_(-6.0)
    return ada


@pytest.mark.parametrize("mode", ["symmetric", "asymmetric"])
def test_soft_round_equals_the_composed_soft_weight_and_regularizer(device, mode):
    ada = _weight(device, mode=mode)
    beta, coef = 7.3, 0.01
    ref_w = ada.soft_reference()
    ref_reg = coef * ada.round_loss(beta)
    zp = None if ada.symmetric else ada.zero_point
    assert mode == "symmetric" or zp is not None
    w, reg = soft_round(ada.v, ada.base, ada.scale, zp, ada.qmin, ada.qmax, torch.tensor(beta, dtype=torch.float64,
                        device=device), torch.tensor(coef, dtype=torch.float64, device=device))
    assert torch.equal(w, ref_w) and torch.equal(reg, ref_reg)
    q = (ada.base + ada.h() + ada.zero_point).detach()
    assert bool((q > ada.qmax).any()) and bool((q < ada.qmin).any())  # both clamps exercised
    c = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    (g_ref,) = torch.autograd.grad((c * ref_w).sum() + 3.0 * ref_reg, ada.v)
    (g,) = torch.autograd.grad((c * w).sum() + 3.0 * reg, ada.v)
    assert torch.allclose(g, g_ref, rtol=1e-12, atol=1e-15)
    assert bool((g_ref == 0).any()) and bool((g_ref != 0).any())
    ada.mode = "soft"
    assert torch.equal(ada(None), ref_w)  # the parametrization's soft weight is the fused one


def test_soft_round_of_a_whole_unit_equals_its_layers(device):
    """One flat ``h(V)`` for layers of different bit widths (per-element ranges) gives each layer's weights."""
    layers = [_weight(device, 3), _weight(device, 5)]
    flat = lambda ts: torch.cat([t.flatten() for t in ts])  # noqa: E731
    v = flat(a.v.detach() for a in layers).requires_grad_(True)
    base = flat(a.base for a in layers)
    scale = flat(a.scale.expand_as(a.base) for a in layers)
    qmin = flat(torch.full_like(a.base, a.qmin) for a in layers)
    qmax = flat(torch.full_like(a.base, a.qmax) for a in layers)
    w, reg = soft_round(v, base, scale, None, qmin, qmax, 2.0, 0.5)
    assert torch.equal(w, flat(a.soft_reference() for a in layers))
    assert torch.allclose(reg, 0.5 * sum(a.round_loss(2.0) for a in layers), rtol=1e-14)


@pytest.mark.parametrize("drop", [False, True])
def test_lsq_quantize_equals_lsq_fake_quantize_with_the_drop_mix(device, drop):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4000, generator=g, dtype=torch.float64) * 0.8 + 0.2).to(device).requires_grad_(True)
    s = torch.tensor(0.07, dtype=torch.float64, device=device, requires_grad=True)
    z, qmin, qmax, gs = torch.tensor(5.0, dtype=torch.float64, device=device), 0, 15, 0.37
    keep = (torch.rand(4000, generator=g, dtype=torch.float64) < 0.5).double().to(device) if drop else None
    ref = lsq_fake_quantize(x, s, z, qmin, qmax, gs)
    if drop:  # the mix of the version before issue 22
        ref = torch.where(keep.bool(), x, ref)
    out = lsq_quantize(x, s, z, qmin, qmax, gs, keep)
    assert torch.equal(out, ref)
    c = torch.randn(4000, generator=g, dtype=torch.float64).to(device)
    gx_ref, gs_ref = torch.autograd.grad((c * ref).sum(), (x, s))
    gx, gs_new = torch.autograd.grad((c * out).sum(), (x, s))
    # autograd's x-gradient is (c * s) / s, within an ulp of the straight-through c the Function passes
    assert torch.allclose(gx, gx_ref, rtol=1e-12, atol=0) and torch.equal(gx != 0, gx_ref != 0)
    assert torch.allclose(gs_new, gs_ref, rtol=1e-12, atol=0)
    r = x.detach() / s.detach() + z
    assert bool((r < qmin).any()) and bool((r > qmax).any())  # both clipped regions exercised


def test_recon_loss_equals_the_composed_output_error(device):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    target = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64).to(device)
    ref = (pred - target).pow(2).sum(1).mean()
    out = recon_loss(pred, target)
    assert torch.equal(out, ref)
    (g_ref,) = torch.autograd.grad(ref, pred)
    (g_new,) = torch.autograd.grad(out, pred)
    assert torch.allclose(g_new, g_ref, rtol=1e-12, atol=0)


def test_hard_and_nearest_weights_are_computed_once_per_mode(device):
    ada = _weight(device)
    for mode in ("hard", "nearest"):
        ada.mode = mode
        first = ada(None)
        assert ada(None) is first  # cached
        up = (ada.v >= 0).double() if mode == "hard" else ada.nearest_up
        ref = (torch.clamp(ada.base + up + ada.zero_point, ada.qmin, ada.qmax) - ada.zero_point) * ada.scale
        assert torch.equal(first, ref) and not first.requires_grad
    ada.mode = "hard"
    assert ada(None) is not first  # a mode change drops the cache
    with pytest.raises(ValueError, match="unknown AdaRound mode 'round'"):
        ada.mode = "round"


# -- the step ------------------------------------------------------------------------------------
def test_a_qdrop_step_of_a_resnet20_block_makes_at_most_120_aten_ops(device):
    """Forward, loss, regularizer, backward and Adam of ``layers.0`` at batch 32 (260 ops before issue 22)."""
    step = _unit_step(device)
    assert len(step.soft) == 2 and len(step.scales) == 2 and step.qx.shape[1:] == (16, 32, 32)
    for _ in range(3):
        step.step()
    count = _Count()
    with count:
        step.step()
    total = sum(count.ops.values())
    assert total <= MAX_OPS, count.ops.most_common()
    assert count.ops["aten.sigmoid.default"] == 1  # h(V) once per step, for both layers
    assert count.ops["aten._local_scalar_dense.default"] == 0  # no .item() inside the step
    assert count.ops["aten.convolution.default"] == 2 and count.ops["aten.rand.generator"] == 2
    step.check()


@pytest.mark.parametrize("method, unit, stage", [("qdrop", "layers.0", "joint"),
                                                 ("adaround", "layers.0.conv1", "weights"),
                                                 ("brecq", "layers.0", "activations")])
def test_the_step_reads_nothing_back_from_the_device(device, method, unit, stage):
    """After the warm-up (and, on CUDA, the capture) a step makes no host read of a tensor and builds
    no tensor from Python data; the losses are read by :meth:`UnitStep.check` only."""
    step = _unit_step(device, unit, method, stage, size=8 if device == "cpu" else 32, cuda_graph=device == "cuda")
    for _ in range(recon_step.WARMUP_STEPS + 1):
        step.step()
    for _ in range(3):
        with _HostReads() as spy:
            step.step()
        assert spy.calls == [], spy.calls
    assert step.captured == (device == "cuda")
    step.check()
    assert int(step.i) == step.steps == recon_step.WARMUP_STEPS + 4


@pytest.mark.parametrize("method", ["qdrop", "brecq"])
def test_the_same_seed_gives_the_same_model(device, method):
    model = build_model("resnet20", 10, 3, 8).eval().to(device)
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(4)).to(device)
    with _deterministic(device):
        a, b = (reconstruct(model, 3, 4, x, method, iters=12, batch_size=16, seed=3) for _ in range(2))
        c = reconstruct(model, 3, 4, x, method, iters=12, batch_size=16, seed=4)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    assert a.ptq_recon["cuda_graph"] == (device == "cuda")
    assert all(u["cuda_graph"] == (device == "cuda") for u in a.ptq_recon["units"] if u["steps"] > 4)


def test_a_nan_names_the_unit_the_stage_and_the_first_bad_step(device, monkeypatch):
    """A NaN at a known step (the regularizer's exponent of step 7 of the second unit) is named at the
    next read of the losses (every CHECK_EVERY = 5 steps here): step 10 of that unit stops the run."""
    tables = recon_step.schedule_tables
    calls = []

    def poisoned(iters, **kw):
        t = tables(iters, **kw)
        calls.append(1)
        if len(calls) == 2:  # the second unit ('layers.0')
            t["beta"][7] = float("nan")
        return t

    checks = []
    check = UnitStep.check

    def spy(self):
        checks.append(self.steps)
        return check(self)

    monkeypatch.setattr(recon_step, "schedule_tables", poisoned)
    monkeypatch.setattr(recon_step, "CHECK_EVERY", 5)
    monkeypatch.setattr(UnitStep, "check", spy)
    model = build_model("resnet20", 10, 3, 8).eval().to(device)
    message = r"joint reconstruction of unit 'layers\.0' \(layers \[.*\]\): the loss is nan at step 7 of 20; lower"
    with pytest.raises(ReconstructionError, match=message):
        reconstruct(model, 4, 4, torch.randn(32, 3, 8, 8).to(device), "qdrop", iters=20, batch_size=8)
    assert checks == [5, 10, 15, 20, 5, 10]


def test_cuda_graph_is_refused_on_a_cpu_model_and_recorded():
    model = build_model("cnn-digits", 10, 1, 8).eval()
    x = torch.randn(32, 1, 8, 8)
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device"):
        reconstruct(model, 4, 4, x, "qdrop", iters=2, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph must be True, False or None"):
        reconstruct(model, 4, 4, x, "qdrop", iters=2, cuda_graph="yes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = reconstruct(model, 4, 4, x, "qdrop", iters=2)
    assert q.ptq_recon["cuda_graph"] is False and q.ptq_recon["cuda_graph_note"] == "CUDA graphs need a CUDA device"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_replayed_graph_gives_the_eager_steps_result():
    """Same unit, same seed: N steps replayed from one captured graph end where N eager steps end."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32).eval()
    with _deterministic("cuda"):
        ends = []
        for graph in (False, True):
            step = _unit_step("cuda", cuda_graph=graph, model=copy.deepcopy(model))
            for _ in range(12):
                step.step()
            step.check()
            assert step.captured == graph
            ends.append([step.v.detach().clone(), *[s.detach().clone() for s in step.scales],
                         step.losses.clone()])
    eager, graphed = ends
    assert all(torch.equal(a, b) for a, b in zip(eager, graphed))
