"""Full precision inside the instruments whatever the user's TF32 / autocast settings, every
setting restored exactly afterwards (also after an exception), and timings that synchronize.

The flags are process-wide, but settable and readable without a GPU: the tests read them back
through PyTorch's own getters (legacy and ``fp32_precision``), which are the ground truth here.
"""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import landscape
from dnq_landscape_common.precision import _restore, _snapshot, full_precision
from landscape import _timing

ROOT = Path(__file__).resolve().parents[2]
NEW_API = hasattr(torch._C, "_get_fp32_precision_getter")
GENERIC = ("generic", "all")
PARENTS = [GENERIC, ("cuda", "all"), ("mkldnn", "all")]
LEAVES = [(b, op) for b in ("cuda", "mkldnn") for op in ("matmul", "conv", "rnn")]
LEGACY = {"cublas_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
          "cudnn_tf32": lambda: torch.backends.cudnn.allow_tf32,
          "matmul_precision": torch.get_float32_matmul_precision}


def readings() -> dict:
    """Everything PyTorch reports about float32 precision (a getter that raises on a mix of the
    legacy and new interfaces reports "raises": that too must come back as it was)."""
    out = {}
    for name, get in LEGACY.items():
        try:
            out[name] = get()
        except RuntimeError:
            out[name] = "raises"
    if NEW_API:
        out.update({n: torch._C._get_fp32_precision_getter(*n) for n in PARENTS + LEAVES})
    return out


def responses() -> dict:
    """How every node reads when the root of the tree changes: nodes that follow their parent
    ("none") must still follow it, explicit ones must not."""
    root = torch._C._get_fp32_precision_getter(*GENERIC)  # the root has no parent: its reading is its value
    out = {}
    for v in ("ieee", "tf32", "none"):
        torch._C._set_fp32_precision_setter(*GENERIC, v)
        out[v] = {n: torch._C._get_fp32_precision_getter(*n) for n in PARENTS[1:] + LEAVES}
    torch._C._set_fp32_precision_setter(*GENERIC, root)
    return out


def reset() -> None:
    """A known state with no node in PyTorch's initial (unsettable) "default" marker."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    if NEW_API:
        for n in PARENTS + LEAVES:
            torch._C._set_fp32_precision_setter(*n, "none")


def set_node(node, value):
    torch._C._set_fp32_precision_setter(*node, value)


# user states, from a reset: TF32 / bf16 allowed in every way PyTorch offers, and mixes of the two
# interfaces that make the legacy getters raise
STATES = {
    "legacy-permissive": lambda: (setattr(torch.backends.cuda.matmul, "allow_tf32", True),
                                  setattr(torch.backends.cudnn, "allow_tf32", True),
                                  torch.set_float32_matmul_precision("medium")),
    "new-api-permissive": lambda: (set_node(GENERIC, "tf32"), set_node(("mkldnn", "matmul"), "bf16")),
    "mixed-interfaces": lambda: (setattr(torch.backends.cudnn, "allow_tf32", True),
                                 set_node(("cuda", "conv"), "ieee"), set_node(("cuda", "matmul"), "tf32")),
    "parent-set": lambda: (set_node(("cuda", "all"), "ieee"), set_node(GENERIC, "tf32"),
                           set_node(("mkldnn", "conv"), "bf16")),
}


@pytest.fixture
def flags():
    """Put the process's flags back after the test, whatever it did to them."""
    state = _snapshot()
    yield
    _restore(state)


def assert_full(r: dict) -> None:
    assert r["cublas_tf32"] is False and r["cudnn_tf32"] is False and r["matmul_precision"] == "highest", r
    if NEW_API:
        assert all(r[leaf] == "ieee" for leaf in LEAVES), r


# -- the context manager ----------------------------------------------------------------------------
@pytest.mark.parametrize("state", list(STATES))
def test_full_precision_inside_and_every_setting_restored(state, flags):
    if not NEW_API and state != "legacy-permissive":
        pytest.skip("PyTorch without the fp32_precision interface")
    reset()
    STATES[state]()
    before = readings()
    follow = responses() if NEW_API else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation (or any other) warning on the way in or out
        with full_precision():
            inside = readings()
            with full_precision():
                assert readings() == inside
            assert readings() == inside  # an inner exit restores nothing: the outer scope still holds
        assert readings() == before
        with pytest.raises(KeyError):
            with full_precision():
                raise KeyError("inside")
    assert_full(inside)
    assert readings() == before
    if NEW_API:
        assert responses() == follow


def test_the_process_defaults_read_back_as_they_were():
    """A fresh interpreter (PyTorch's own initial flags, cuDNN's TF32 on) reads the same after."""
    code = textwrap.dedent("""
        import warnings, torch
        warnings.simplefilter("error")
        from landscape.precision import full_precision
        def read():
            out = [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                   torch.get_float32_matmul_precision()]
            if hasattr(torch._C, "_get_fp32_precision_getter"):
                nodes = [("generic", "all")] + [(b, o) for b in ("cuda", "mkldnn")
                                                for o in ("all", "matmul", "conv", "rnn")]
                out += [torch._C._get_fp32_precision_getter(*n) for n in nodes]
            return out
        before = read()
        with full_precision():
            inside = read()
        print(before == read(), inside[:3] == [False, False, "highest"], before[1])
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "True", "True"]


def test_autocast_is_off_inside_and_back_on_after():
    lin = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16
        with full_precision():
            assert not torch.is_autocast_enabled("cpu") and lin(x).dtype == torch.float32
        with pytest.raises(ValueError):
            with full_precision():
                raise ValueError
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert lin(x).dtype == torch.bfloat16


# -- the instruments --------------------------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    from dnq.models import build_model

    model = build_model("cnn-digits", 10, 1, 8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in (24, 9)]
    return model.eval(), data


def _op(model, data, **kw):
    # the last convolution, its BatchNorm and the classifier: double backward through the first
    # convolutions costs seconds per product on a 2-core CPU
    kw = {"params": ["7.weight", "8.*", "12.*"], "method": "rev-rev", "quadratic": "hvp", **kw}
    return landscape.HessianOperator(model, F.cross_entropy, data, **kw)


def _block(op, k=3):
    return torch.randn(op.dim, k, generator=torch.Generator().manual_seed(5))


def _study_loss(model, data):
    from landscape.study import MeasureContext

    fake = SimpleNamespace(hdata=data, loss_fn=F.cross_entropy)
    return torch.tensor(MeasureContext.loss(fake, model))


def _study_measurement(model, data):
    from landscape.study import AccuracyKey, Measure

    rec = {"train_key": "k", "measurements": {}}
    fake = SimpleNamespace(rec=rec, s=SimpleNamespace(_save=lambda r: None))
    x, y = data[0]
    # any measurement
    Measure._do(fake, "m", AccuracyKey(splits=("val",)), lambda: float(F.cross_entropy(model(x), y).detach()))
    return torch.tensor(rec["measurements"]["m"]["value"])


# each entry point that computes numbers, with fixed methods (an "auto" choice times, and may differ)
CASES = {
    "matmat": lambda m, d: _op(m, d).matmat(_block(_op(m, d))),
    "matmat-fwd-rev": lambda m, d: _op(m, d, method="fwd-rev").matmat(_block(_op(m, d))),
    "quadratic-taylor": lambda m, d: _op(m, d, quadratic="taylor").quadratic_forms(_block(_op(m, d))),
    "gradient": lambda m, d: torch.cat([_op(m, d).gradient()[0], torch.tensor([_op(m, d).gradient()[1]])]),
    "trace": lambda m, d: torch.tensor(landscape.hessian_trace(_op(m, d), 9, method="hutch++", seed=1).value),
    "block-traces": lambda m, d: torch.tensor(landscape.block_traces(_op(m, d), 4, seed=1).total),
    "eigen": lambda m, d: torch.tensor(landscape.top_eigenvalues(_op(m, d), k=1, tol=1e-2, seed=0).eigenvalues),
    "density": lambda m, d: landscape.spectral_density(_op(m, d), 1, 4, seed=0).nodes,
    "loss-increase": lambda m, d: torch.tensor(landscape.predicted_loss_increase(
        _op(m, d), {"7.weight": torch.full((32,), 1e-4)}, num_matvecs=4).predicted),
    "surface": lambda m, d: torch.as_tensor(landscape.surface_2d(
        m, F.cross_entropy, d, landscape.random_directions(m, 2, seed=0), steps=3, chunk_size=1, max_batch=0).loss),
    "surface-vmap": lambda m, d: torch.as_tensor(landscape.surface_1d(
        m, F.cross_entropy, d, landscape.random_directions(m, 1, seed=0)[0], steps=3, chunk_size=3).loss),
    "study-loss": _study_loss,
    "study-measurement": _study_measurement,
}


def _record(model, seen: list, fail_at: int | None = None):
    """Forward hooks on every module: what each forward saw (and, optionally, an error)."""
    def hook(mod, args, out):
        seen.append({**readings(), "autocast_cpu": torch.is_autocast_enabled("cpu"),
                     "autocast_cuda": torch.is_autocast_enabled("cuda"),
                     "dtype": out.dtype if isinstance(out, torch.Tensor) else None})
        if fail_at is not None and len(seen) >= fail_at:
            raise RuntimeError("a hook failed")

    return [m.register_forward_hook(hook) for m in model.modules()]


def _permissive():
    """TF32 and bf16 allowed through both interfaces (the legacy getters raise on this mix)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("medium")  # oneDNN bf16 for float32 products on the CPU
    if NEW_API:
        set_node(GENERIC, "tf32")


@pytest.mark.parametrize("case", list(CASES))
def test_instruments_compute_in_full_precision_and_restore_the_settings(case, flags):
    model, data = _model()
    ref = CASES[case](model, data)  # default flags, no autocast
    _permissive()
    before = readings()
    seen = []
    handles = _record(model, seen)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = CASES[case](model, data)
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert readings() == before
    finally:
        for h in handles:
            h.remove()
    assert seen, "no forward pass was observed"
    for s in seen:
        assert_full(s)
        assert not s["autocast_cpu"] and not s["autocast_cuda"] and s["dtype"] in (torch.float32, None), s
    assert torch.equal(torch.as_tensor(out), torch.as_tensor(ref)), (out, ref)
    assert readings() == before


def test_the_outer_settings_would_change_the_numbers():
    """The check above can fail: the same forward pass under the outer autocast differs."""
    model, data = _model()
    x = data[0][0]
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16 and not torch.equal(low.float(), ref)


@pytest.mark.parametrize("case", ["matmat", "surface", "quadratic-taylor"])
def test_settings_restored_after_an_error_inside(case, flags):
    model, data = _model()
    _permissive()
    before = readings()
    seen = []
    handles = _record(model, seen, fail_at=3)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with pytest.raises(RuntimeError, match="a hook failed"):
                CASES[case](model, data)
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 3 and all(not s["autocast_cpu"] for s in seen)
    assert readings() == before


# -- timings ----------------------------------------------------------------------------------------
@pytest.fixture
def sync_spy(monkeypatch):
    events = []

    def spy(device=None):
        events.append(("sync", device))

    monkeypatch.setattr(torch.cuda, "synchronize", spy)
    return events


def test_timings_synchronize_cuda_before_and_after(sync_spy):
    dev = torch.device("cuda")
    out, t = _timing.timed(lambda: sync_spy.append("work") or 7, dev)
    assert out == 7 and t >= 0
    assert sync_spy == [("sync", dev), "work", ("sync", dev)]
    sync_spy.clear()
    _timing.best_of(lambda: sync_spy.append("work"), dev, repeat=2, warmup=True)
    assert sync_spy == ["work"] + [("sync", dev), "work", ("sync", dev)] * 2


def test_the_closing_synchronization_is_inside_the_timed_span(monkeypatch):
    """On CUDA the work is queued; the wait for it must count (here a 50 ms 'kernel')."""
    import time

    calls = []

    def slow_sync(device=None):
        calls.append(device)
        if len(calls) == 2:
            time.sleep(0.05)

    monkeypatch.setattr(torch.cuda, "synchronize", slow_sync)
    assert _timing.timed(lambda: None, torch.device("cuda", 0))[1] >= 0.05


def test_timings_on_the_cpu_do_not_synchronize(sync_spy):
    out, _ = _timing.timed(lambda: sync_spy.append("work") or 3, torch.device("cpu"))
    assert out == 3 and sync_spy == ["work"]


def test_the_instruments_time_their_choices_through_the_helper(monkeypatch):
    """Every timed choice (products, quadratic forms, surface batching) goes through the one helper."""
    devices = []
    real = _timing.synchronize
    monkeypatch.setattr(_timing, "synchronize", lambda d: (devices.append(torch.device(d)), real(d)))
    model, data = _model()
    op = landscape.HessianOperator(model, F.cross_entropy, [(torch.cat([d[0] for d in data]),
                                                            torch.cat([d[1] for d in data]))] * 2)
    op.quadratic_forms(_block(op, 2))  # the quadratic-form choice (Taylor vs products)
    n_quadratic = len(devices)
    op.matmat(_block(op, 2))  # the product method's choice
    n_products = len(devices) - n_quadratic
    landscape.surface_1d(model, F.cross_entropy, data, landscape.random_directions(model, 1, seed=0)[0], steps=16)
    n_surface = len(devices) - n_quadratic - n_products
    assert n_quadratic == 8 and n_products >= 6 and n_surface == 4, (n_quadratic, n_products, n_surface)
    assert set(devices) == {torch.device("cpu")}
    assert np.isfinite(op.timings["quadratic:taylor"])
