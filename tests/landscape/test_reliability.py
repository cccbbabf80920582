"""Reliability of landscape (issue 10): no user error loses data, every bad input gets one clear
line, a study folder is locked while a study runs.

* the instruments on a model whose loss is NaN or Inf raise NonFiniteError naming the instrument
  and the batch (or return NaN with on_nonfinite="nan"); surfaces keep NaN by default;
* a corpus of bad inputs to ``landscape study`` / ``landscape report`` (wrong types, values out
  of range, bad settings, corrupt files, missing devices, unusable folders): each exits 2 with one
  line on stderr, no traceback, and leaves the folder tree as it was (names, sizes, mtimes);
* a corrupt model record is moved aside and measured again; a corrupt study.json is an error;
* CSV cells that a spreadsheet would run as formulas are escaped, numbers stay numbers;
* a second study on a folder in use is refused, naming the holder.
"""

import csv
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from landscape import (
    HessianOperator,
    NonFiniteError,
    block_traces,
    hessian_trace,
    noise_weighted_trace,
    power_iteration,
    predicted_loss_increase,
    random_directions,
    spectral_density,
    surface_1d,
    surface_2d,
    top_eigenvalues,
)
from landscape.cli import main
from landscape.study import Study, StudyConfig, StudyError
from tests.conftest import TEST_THREADS

ROOT = Path(__file__).resolve().parents[2]
CE = nn.functional.cross_entropy

# a study that trains and measures one small model in a few seconds
MINI = {"name": "mini", "data": "digits", "model": "mlp-digits", "runs": [{"method": "sgd"}], "seeds": [0],
        "bits": ["W4A4"], "train_bits": "W4A4", "train": {"epochs": 1, "batch_size": 128},
        "ptq": {"variants": ["rtn"]},
        "instruments": {"hessian_samples": 64, "hessian_batch": 32, "trace_matvecs": 6, "eig_k": 1, "eig_tol": 1e-1,
                        "density_runs": 1, "density_steps": 4, "block_matvecs": 2, "noise_matvecs": 2,
                        "surface_steps": 2, "slice_steps": 2}}


# -- non-finite losses in the instruments ------------------------------------------------------------
def _mlp(nan: bool = False) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    if nan:
        with torch.no_grad():
            m[2].weight[0, 0] = float("nan")
    return m


def _data(bad_batch: int | None = None) -> list:
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(3)]
    if bad_batch is not None:
        data[bad_batch][0][0, 0] = float("nan")
    return data


def _inf_loss(out, y):
    """A finite gradient and Hessian, an infinite loss: only the loss check can see it."""
    return CE(out, y) + torch.tensor(float("inf"), dtype=out.dtype)


# each instrument: (name, call(op, **kw), NaN values of the result)
INSTRUMENTS = [
    ("hessian_trace", lambda op, **kw: hessian_trace(op, 6, **kw), lambda r: [r.value, r.std_error]),
    ("block_traces", lambda op, **kw: block_traces(op, 4, **kw), lambda r: [r.total, *r.values.values()]),
    ("top_eigenvalues", lambda op, **kw: top_eigenvalues(op, 2, **kw), lambda r: r.eigenvalues),
    ("power_iteration", lambda op, **kw: power_iteration(op, 1, **kw), lambda r: r.eigenvalues),
    ("spectral_density", lambda op, **kw: spectral_density(op, 2, 4, **kw),
     lambda r: [r.sigma, r.moment(1), *r.density.tolist()]),
    ("noise_weighted_trace", lambda op, **kw: noise_weighted_trace(op, {"0.weight": torch.ones(6)}, 4, **kw),
     lambda r: [r.value]),
    ("predicted_loss_increase",
     lambda op, **kw: predicted_loss_increase(op, {"0.weight": torch.ones(6)}, {"2.bias": torch.ones(3)}, 2, **kw),
     lambda r: [r.predicted, r.trace_term, r.gradient_term, r.loss]),
]


@pytest.mark.parametrize("name,call,values", INSTRUMENTS, ids=[i[0] for i in INSTRUMENTS])
def test_every_instrument_names_itself_and_the_batch_or_returns_nan(name, call, values):
    op = HessianOperator(_mlp(nan=True), CE, _data())
    with pytest.raises(NonFiniteError, match=rf"^{name}: the loss is NaN or Inf on batch 0 ") as e:
        call(op)
    assert e.value.instrument == name and e.value.batch == 0 and "on_nonfinite='nan'" in str(e.value)
    result = call(op, on_nonfinite="nan")
    assert values(result) and all(math.isnan(v) for v in values(result))
    # the operator's own policy is the instruments' default
    quiet = HessianOperator(_mlp(nan=True), CE, _data(), on_nonfinite="nan")
    assert all(math.isnan(v) for v in values(call(quiet)))
    with pytest.raises(ValueError, match="on_nonfinite must be 'raise' or 'nan', got 'ignore'"):
        call(op, on_nonfinite="ignore")


@pytest.mark.parametrize("method", ["fwd-rev", "rev-rev", "cached"])
@pytest.mark.parametrize("quadratic", ["hvp", "taylor"])
def test_the_first_bad_batch_is_named_whatever_the_product_method(method, quadratic):
    op = HessianOperator(_mlp(), CE, _data(bad_batch=2), method=method, quadratic=quadratic)
    for name, call, _ in INSTRUMENTS[:3]:
        with pytest.raises(NonFiniteError, match=rf"^{name}: the (loss|Hessian-vector product|quadratic form) is "
                                                 r"NaN or Inf on batch 2 "):
            call(op)
    assert op.instrument is None and op.on_nonfinite == "raise"  # the instrument's scope is closed
    clean = HessianOperator(_mlp(), CE, _data(), method=method, quadratic=quadratic)
    assert math.isfinite(hessian_trace(clean, 6).value)  # and a finite model is measured as before


def test_an_infinite_loss_with_finite_products_is_caught_by_the_loss_check():
    op = HessianOperator(_mlp(), _inf_loss, _data(), method="rev-rev")
    assert bool(torch.isfinite(HessianOperator(_mlp(), _inf_loss, _data(), on_nonfinite="nan")
                               .matvec(torch.ones(op.dim, dtype=torch.float64))).all())
    with pytest.raises(NonFiniteError, match="^HessianOperator: the loss is NaN or Inf on batch 0"):
        op.matvec(torch.ones(op.dim, dtype=torch.float64))
    with pytest.raises(NonFiniteError, match="^predicted_loss_increase: the loss is NaN or Inf on batch 0"):
        predicted_loss_increase(op, {"0.weight": torch.ones(6)}, num_matvecs=2)
    with pytest.raises(NonFiniteError, match="^HessianOperator: the loss is NaN or Inf on batch 0"):
        op.gradient()


def test_raw_products_raise_by_default_and_pass_nan_through_on_request():
    op = HessianOperator(_mlp(nan=True), CE, _data())
    v = torch.ones(op.dim, dtype=torch.float64)
    with pytest.raises(NonFiniteError, match="^HessianOperator: the loss"):
        op.matvec(v)
    nan_op = HessianOperator(_mlp(nan=True), CE, _data(), on_nonfinite="nan")
    assert torch.isnan(nan_op.matvec(v)).all()
    with pytest.raises(ValueError, match="on_nonfinite must be 'raise' or 'nan'"):
        HessianOperator(_mlp(), CE, _data(), on_nonfinite=False)


class _Dense:
    """A duck-typed operator (no batches): its products are checked as a whole."""

    def __init__(self, H):
        self.H, self.dim, self.dtype, self.device, self.num_matvecs = H, H.shape[0], H.dtype, H.device, 0

    def matmat(self, V):
        return self.H @ V

    matvec = matmat


def test_a_duck_typed_operator_with_nan_is_named_without_a_batch():
    H = torch.eye(5, dtype=torch.float64)
    H[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="^top_eigenvalues: the Hessian-vector product is NaN or Inf on some "):
        top_eigenvalues(_Dense(H), k=1)
    assert math.isnan(hessian_trace(_Dense(H), 6, on_nonfinite="nan").value)


def test_surfaces_keep_nan_by_default_and_raise_on_request_naming_point_and_batch():
    model, data = _mlp(), _data(bad_batch=1)
    d = random_directions(model, 2, seed=0)
    s = surface_1d(model, CE, data, d[0], steps=3, max_batch=0)
    assert all(math.isnan(v) for v in s.loss)  # batch 1 is bad at every point
    with pytest.raises(NonFiniteError, match=r"^surface_1d: the loss is NaN or Inf on batch 1 of the data at the grid "
                                             r"point \(-1\)"):
        surface_1d(model, CE, data, d[0], steps=3, max_batch=0, on_nonfinite="raise")
    with pytest.raises(NonFiniteError, match=r"^surface_2d: .* on batch 1 .*\(-1, -1\)"):
        surface_2d(model, CE, data, d, steps=2, max_batch=0, on_nonfinite="raise")
    with pytest.raises(ValueError, match="on_nonfinite must be 'raise' or 'nan'"):
        surface_2d(model, CE, data, d, steps=2, on_nonfinite="skip")
    ok = surface_1d(model, CE, _data(), d[0], steps=3, on_nonfinite="raise")  # a finite surface passes
    assert all(math.isfinite(v) for v in ok.loss)


# -- the bad-input corpus of the command line --------------------------------------------------------
def snapshot(root: Path) -> dict:
    """Every entry under ``root`` (and root itself): kind, size and mtime."""
    out = {}
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


def _cfg(tmp: Path, **changes) -> str:
    cfg = json.loads(json.dumps(MINI))
    cfg.update(changes)
    path = tmp / "study_config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _study(tmp: Path, *extra, out: str = "out") -> list[str]:
    return ["study", "--config", _cfg(tmp), "--out", str(tmp / out) if out else out, "--quiet", "--no-report",
            "--device", "cpu", *extra]


def _fake_study(tmp: Path, name: str = "mini", record=None, meta=None) -> Path:
    """A study folder as `landscape study` leaves it (study.json, models/), written by hand."""
    d = tmp / "st"
    (d / "models").mkdir(parents=True)
    (d / "runs").mkdir()
    cfg = json.loads(json.dumps(MINI))
    cfg["name"] = name
    (d / "study.json").write_text(json.dumps({"version": 2, "config": cfg, "hash": "x"}) if meta is None else meta)
    if record is not None:
        (d / "models" / "sgd-s0.json").write_text(record)
    return d


def _locked_dir(tmp: Path) -> Path:
    d = tmp / "ro"
    d.mkdir()
    d.chmod(0o500)
    return d


NO_CUDA = torch.cuda.is_available()
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0

# (id, argv builder given the test's folder, a piece of the expected message, skip reason or None)
CASES = [
    # flags: wrong values, missing values, unknown flags
    ("no-command-flag", lambda t: ["--nope"], "unrecognized arguments: --nope", None),
    ("unknown-command", lambda t: ["bogus"], "invalid choice: 'bogus'", None),
    ("study-no-out", lambda t: ["study", "--config", _cfg(t)], "give --out FOLDER (or --plan", None),
    ("plan-json-without-plan", lambda t: ["study", "--config", _cfg(t), "--plan-json", str(t / "p.json")],
     "give --plan with it", None),
    ("plan-json-a-folder", lambda t: ["study", "--config", _cfg(t), "--plan", "--plan-json", str(t)],
     "give a file name in an existing folder", None),
    ("preset-unknown", lambda t: ["study", "--preset", "imagenet", "--out", str(t / "o")], "invalid choice", None),
    ("preset-no-value", lambda t: ["study", "--out", str(t / "o"), "--preset"], "expected one argument", None),
    ("preset-several-models", lambda t: ["study", "--preset", "cifar100", "--out", str(t / "o")], "several models",
     None),
    ("config-missing", lambda t: ["study", "--config", str(t / "nope.json"), "--out", str(t / "o")], "not found", None),
    ("config-a-folder", lambda t: ["study", "--config", str(t), "--out", str(t / "o")], "it is a folder", None),
    ("config-corrupt-json", lambda t: (t / "c.json").write_text("{oops") and
     ["study", "--config", str(t / "c.json"), "--out", str(t / "o")], "cannot parse", None),
    ("config-corrupt-toml", lambda t: (t / "c.toml").write_text("a = = 1") and
     ["study", "--config", str(t / "c.toml"), "--out", str(t / "o")], "as TOML", None),
    ("config-binary", lambda t: (t / "c.json").write_bytes(b"\xff\xfe\x00") and
     ["study", "--config", str(t / "c.json"), "--out", str(t / "o")], "cannot parse", None),
    ("config-a-list", lambda t: (t / "c.json").write_text("[1, 2]") and
     ["study", "--config", str(t / "c.json"), "--out", str(t / "o")], "must hold a mapping", None),
    ("out-empty", lambda t: _study(t, out=""), "empty path", None),
    ("out-under-a-file", lambda t: (t / "f").write_text("x") and _study(t, out="f/sub"), "is not a folder", None),
    ("out-is-a-file", lambda t: (t / "f").write_text("x") and _study(t, out="f"), "is not a folder", None),
    ("out-not-empty", lambda t: (t / "out").mkdir() or (t / "out" / "mine.txt").write_text("keep") and _study(t),
     "is not empty", None),
    ("out-other-study", lambda t: _fake_study(t, name="other") and _study(t, out="st"), "holds study 'other'", None),
    ("out-corrupt-study-json", lambda t: _fake_study(t, meta="{trunc") and _study(t, out="st"),
     "study.json is corrupt", None),
    ("out-study-json-no-config", lambda t: _fake_study(t, meta="[]") and _study(t, out="st"),
     "holds no study configuration", None),
    ("out-unwritable", lambda t: _locked_dir(t) and _study(t, out="ro/sub"), "not writable",
     "running as root: permissions do not apply" if ROOT_USER else None),
    ("device-unknown", lambda t: _study(t, "--device", "tpu"), "unknown device 'tpu'", None),
    ("device-bad-index", lambda t: _study(t, "--device", "cuda:x"), "unknown device 'cuda:x'", None),
    ("device-cuda-missing", lambda t: _study(t, "--device", "cuda"), "CUDA is not available",
     "this machine has CUDA" if NO_CUDA else None),
    ("device-cuda-index-missing", lambda t: _study(t, "--device", "cuda:7"), "CUDA is not available",
     "this machine has CUDA" if NO_CUDA else None),
    ("report-flag-value", lambda t: _study(t, "--report=3"), "ignored explicit argument", None),
    ("quiet-flag-value", lambda t: _study(t, "--quiet=1"), "ignored explicit argument", None),
    # --set: syntax and keys
    ("set-no-equals", lambda t: _study(t, "--set", "epochs"), "expects KEY=VALUE", None),
    ("set-empty-key", lambda t: _study(t, "--set", "=3"), "dotted path", None),
    ("set-empty-part", lambda t: _study(t, "--set", "train..epochs=3"), "dotted path", None),
    ("set-conflict", lambda t: _study(t, "--set", "train=1", "--set", "train.epochs=2"), "given a value by another",
     None),
    ("set-unknown-key", lambda t: _study(t, "--set", "epochs=2"), "unknown study keys ['epochs']", None),
    ("set-unknown-instrument", lambda t: _study(t, "--set", "instruments.probes=3"), "unknown instrument keys", None),
    ("set-unknown-train", lambda t: _study(t, "--set", "train.epoch=3"), "unknown training settings ['epoch']", None),
    ("set-unknown-ptq", lambda t: _study(t, "--set", "ptq.bits=3"), "ptq: unknown keys", None),
    # study keys of the wrong type or out of range
    ("name-empty", lambda t: _study(t, "--set", "name="), "name must be a non-empty string", None),
    ("name-number", lambda t: _study(t, "--set", "name=3"), "name must be a non-empty string", None),
    ("data-number", lambda t: _study(t, "--set", "data=3"), "data must be a non-empty string", None),
    ("data-unknown", lambda t: _study(t, "--set", "data=imagenet"), "unknown dataset 'imagenet'", None),
    ("data-npz-missing", lambda t: _study(t, "--set", "data=npz:/nonexistent/x.npz"), "cannot load dataset", None),
    ("model-unknown", lambda t: _study(t, "--set", "model=resnet9000"), "unknown model 'resnet9000'", None),
    ("model-list", lambda t: _study(t, "--set", 'model=["resnet20"]'), "several models", None),
    ("runs-not-a-list", lambda t: _study(t, "--set", "runs=5"), "runs must be a list of mappings", None),
    ("runs-empty", lambda t: _study(t, "--set", "runs=[]"), "has no runs", None),
    ("runs-no-method", lambda t: _study(t, "--set", 'runs=[{"lambda_max": 1}]'), "has no 'method'", None),
    ("runs-bad-method", lambda t: _study(t, "--set", 'runs=[{"method": "adamw"}]'), "unknown method 'adamw'", None),
    ("runs-empty-sweep", lambda t: _study(t, "--set", 'runs=[{"method": "dnq", "lambda_max": []}]'),
     "sweep an empty list", None),
    ("runs-seed", lambda t: _study(t, "--set", 'runs=[{"method": "sgd", "seed": 3}]'), "seed has no effect", None),
    ("runs-bad-type", lambda t: _study(t, "--set", 'runs=[{"method": "dnq", "lambda_max": "big"}]'),
     "lambda_max must be a number", None),
    ("runs-duplicate", lambda t: _study(t, "--set", 'runs=[{"method": "sgd"}, {"method": "sgd"}]'),
     "same settings or name", None),
    ("seeds-empty", lambda t: _study(t, "--set", "seeds=[]"), "seeds must be a non-empty list", None),
    ("seeds-bool", lambda t: _study(t, "--set", "seeds=[true]"), "seeds must be a non-empty list", None),
    ("seeds-not-list", lambda t: _study(t, "--set", "seeds=0"), "seeds must be a non-empty list", None),
    ("bits-string", lambda t: _study(t, "--set", "bits=W4A4"), "bits must be a non-empty list", None),
    ("bits-out-of-range", lambda t: _study(t, "--set", 'bits=["W9A9"]'), "bad bit-width", None),
    ("bits-twice", lambda t: _study(t, "--set", 'bits=["W4A4", "W4A4"]'), "twice", None),
    ("train-bits-bad", lambda t: _study(t, "--set", "train_bits=W4"), "bad bit-width", None),
    ("train-not-a-mapping", lambda t: _study(t, "--set", "train=[1]"), "train must be a mapping", None),
    ("train-method", lambda t: _study(t, "--set", "train.method=sam"), "train.method has no effect", None),
    ("epochs-negative", lambda t: _study(t, "--set", "train.epochs=-1"), "run 'sgd-s0': epochs must be", None),
    ("epochs-text", lambda t: _study(t, "--set", "train.epochs=many"), "epochs must be an integer", None),
    ("epochs-float", lambda t: _study(t, "--set", "train.epochs=1.5"), "epochs must be an integer", None),
    ("lr-negative", lambda t: _study(t, "--set", "train.lr=-0.1"), "lr must be a positive number", None),
    ("lr-nan", lambda t: _study(t, "--set", "train.lr=NaN"), "lr must be a finite number", None),
    ("lr-infinite", lambda t: _study(t, "--set", "train.lr=Infinity"), "lr must be a finite number", None),
    ("lr-text", lambda t: _study(t, "--set", "train.lr=fast"), "lr must be a number", None),
    ("momentum-out-of-range", lambda t: _study(t, "--set", "train.momentum=1.5"), "momentum", None),
    ("batch-size-zero", lambda t: _study(t, "--set", "train.batch_size=0"), "batch_size must be >= 1", None),
    ("batch-size-too-large", lambda t: _study(t, "--set", "train.batch_size=100000"),
     "larger than the 1150 training images", None),
    ("batch-size-vs-tiny-data", lambda t: _study(t, "--set", "data=synthetic:10:20:8"), "larger than the", None),
    ("val-size-out-of-range", lambda t: _study(t, "--set", "train.val_size=1.5"), "val_size must be", None),
    ("wbits-out-of-range", lambda t: _study(t, "--set", "train.wbits=99"), "wbits must be an integer in", None),
    ("sam-rho-zero", lambda t: _study(t, "--set", 'runs=[{"method": "sam", "sam_rho": 0}]'), "sam_rho must be > 0",
     None),
    ("train-device-cuda", lambda t: _study(t, "--set", "train.device=cuda"), "CUDA is not available",
     "this machine has CUDA" if NO_CUDA else None),
    ("data-root-number", lambda t: _study(t, "--set", "data_root=5"), "data_root must be a path", None),
    # instruments and PTQ
    ("instruments-not-mapping", lambda t: _study(t, "--set", "instruments=5"), "instruments must be a mapping", None),
    ("trace-matvecs-zero", lambda t: _study(t, "--set", "instruments.trace_matvecs=0"),
     "instruments.trace_matvecs must be an integer >= 6", None),
    ("trace-matvecs-text", lambda t: _study(t, "--set", "instruments.trace_matvecs=many"),
     "instruments.trace_matvecs must be an integer", None),
    ("trace-method", lambda t: _study(t, "--set", "instruments.trace_method=girard"), "trace_method must be", None),
    ("hessian-batch-bool", lambda t: _study(t, "--set", "instruments.hessian_batch=true"),
     "hessian_batch must be an integer", None),
    ("eig-k-too-large", lambda t: _study(t, "--set", "instruments.eig_k=100000000"), "more than the", None),
    ("eig-tol-negative", lambda t: _study(t, "--set", "instruments.eig_tol=-1"), "eig_tol must be a number > 0", None),
    ("surface-span-nan", lambda t: _study(t, "--set", "instruments.surface_span=NaN"), "surface_span must be", None),
    ("slice-span-reversed", lambda t: _study(t, "--set", "instruments.slice_span=[1, 0]"), "slice_span must be", None),
    ("slice-span-scalar", lambda t: _study(t, "--set", "instruments.slice_span=1"), "slice_span must be a pair", None),
    ("block-matvecs-one", lambda t: _study(t, "--set", "instruments.block_matvecs=1"), "block_matvecs must be", None),
    ("ptq-not-mapping", lambda t: _study(t, "--set", "ptq=1"),
     'ptq must be a list of PTQ methods (e.g. ["rtn", "qdrop"]) or a mapping', None),
    ("ptq-variant", lambda t: _study(t, "--set", 'ptq.variants=["gptq"]'), "ptq.variants must be", None),
    ("ptq-variants-string", lambda t: _study(t, "--set", "ptq.variants=rtn"), "ptq.variants must be", None),
    ("ptq-calib-size", lambda t: _study(t, "--set", "ptq.calib_size=0"), "calib_size must be an integer >= 1", None),
    ("ptq-first-last", lambda t: _study(t, "--set", "ptq.first_last_bits=99"), "first_last_bits must be", None),
    ("ptq-fixed-setting", lambda t: _study(t, "--set", "ptq.range=percentile"), "cannot be changed", None),
    # landscape report
    ("report-no-path", lambda t: ["report"], "required: path", None),
    ("report-missing", lambda t: ["report", str(t / "nope")], "does not exist", None),
    ("report-a-file", lambda t: (t / "f").write_text("x") and ["report", str(t / "f")], "is not a folder", None),
    ("report-no-study", lambda t: ["report", str(t)], "holds no study.json", None),
    ("report-static-value", lambda t: ["report", str(t), "--no-static=1"], "ignored explicit argument", None),
    ("report-unknown-flag", lambda t: ["report", str(t), "--static"], "unrecognized arguments", None),
    ("report-corrupt-study-json", lambda t: _fake_study(t, meta='{"config": ') and ["report", str(t / "st")],
     "study.json is corrupt", None),
    ("report-study-json-a-list", lambda t: _fake_study(t, meta="[1]") and ["report", str(t / "st")],
     "holds no study configuration", None),
    ("report-invalid-config", lambda t: _fake_study(t, meta='{"config": {"runs": 5}}') and ["report", str(t / "st")],
     "invalid configuration", None),
    ("report-corrupt-record", lambda t: _fake_study(t, record='{"id": "sgd-s0", "measu') and ["report", str(t / "st")],
     "sgd-s0.json is corrupt", None),
    ("report-record-not-a-mapping", lambda t: _fake_study(t, record="[]") and ["report", str(t / "st")],
     "not a model record", None),
    ("report-record-wrong-id", lambda t: _fake_study(t, record='{"id": "x", "settings": {}, "measurements": {}}')
     and ["report", str(t / "st")], "not its file name", None),
    ("report-no-records", lambda t: _fake_study(t) and ["report", str(t / "st")], "no model records yet", None),
    # landscape sensitivity
    ("sensitivity-no-run", lambda t: ["sensitivity"], "required: run", None),
    ("sensitivity-no-model", lambda t: ["sensitivity", str(t), "--quiet"], "no model.pt", None),
    ("sensitivity-bits", lambda t: ["sensitivity", str(t), "--bits", "2,9"], "bad bit list", None),
    ("sensitivity-samples", lambda t: ["sensitivity", str(t), "--samples", "0"], "samples must be an integer >= 1",
     None),
    ("sensitivity-matvecs", lambda t: ["sensitivity", str(t), "--matvecs", "1"], "matvecs must be an integer >= 2",
     None),
    ("sensitivity-range", lambda t: ["sensitivity", str(t), "--range", "kl"], "unknown range method", None),
    ("sensitivity-seed", lambda t: ["sensitivity", str(t), "--seed", "x"], "invalid int value", None),
    ("sensitivity-device", lambda t: ["sensitivity", str(t), "--device", "tpu"], "unknown device", None),
    ("sensitivity-recompute-value", lambda t: ["sensitivity", str(t), "--recompute=1"], "ignored explicit argument",
     None),
    ("sensitivity-out-no-model", lambda t: ["sensitivity", str(t), "--out", str(t / "s.json")], "no model.pt", None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    name, argv, expected, skip = case
    if skip:
        pytest.skip(skip)
    monkeypatch.chdir(tmp_path)  # anything written relative to the working folder lands in the snapshot
    monkeypatch.delenv("LANDSCAPE_DEBUG", raising=False)
    args = argv(tmp_path)
    before = snapshot(tmp_path)
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 2, (name, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    prog = "landscape" if name in ("no-command-flag", "unknown-command") else f"landscape {args[0]}"
    assert lines[0].startswith(f"{prog}: error: ") and expected in lines[0], lines[0]
    assert snapshot(tmp_path) == before, f"{name} changed the folder tree"


def test_the_corpus_covers_every_flag_of_every_command(tmp_path):
    from landscape.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    flags = {s for cmd in sub.choices.values() for a in cmd._actions for s in a.option_strings
             if s not in ("-h", "--help", "--debug")}
    used = set()
    for i, (_, argv, _, _) in enumerate(CASES):
        d = tmp_path / str(i)
        d.mkdir()
        used |= {a.split("=")[0] for a in argv(d) if a.startswith("--")}
    assert flags - {"--no-report"} <= used, flags - used
    assert len(CASES) >= 100


def test_debug_flag_and_environment_show_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StudyError, match="epochs must be"):
        main([*_study(tmp_path, "--set", "train.epochs=-1"), "--debug"])
    with pytest.raises(StudyError, match="epochs must be"):
        main(["--debug", *_study(tmp_path, "--set", "train.epochs=-1")])
    monkeypatch.setenv("LANDSCAPE_DEBUG", "1")
    with pytest.raises(StudyError, match="no study.json"):
        main(["report", str(tmp_path)])
    monkeypatch.setenv("LANDSCAPE_DEBUG", "0")
    assert main(["report", str(tmp_path)]) == 2


def test_ctrl_c_exits_130_and_a_bug_keeps_its_traceback(capsys):
    from landscape.cli import guarded

    def interrupted():
        raise KeyboardInterrupt

    def bug():
        raise TypeError("a bug")

    assert guarded("landscape study", interrupted) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    with pytest.raises(TypeError, match="a bug"):  # not a user error: the traceback is the report
        guarded("landscape study", bug)


def test_the_report_module_entry_point_is_guarded_too(tmp_path, capsys):
    from landscape.report import main as report_main

    assert report_main([str(tmp_path)]) == 2
    assert report_main([str(tmp_path), "--out", str(tmp_path / "no" / "r.html")]) == 2
    assert report_main([str(tmp_path), "--bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith(("landscape report: error:", "python -m landscape.report: error:"))
                                 for line in err), err


# -- a real (tiny) study: corrupt records, non-finite measurements, locks, CSV ------------------------
@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    torch.set_num_threads(TEST_THREADS)
    out = tmp_path_factory.mktemp("mini") / "study"
    Study(StudyConfig.from_dict(MINI), out, device="cpu", progress=False).run()
    return out


def test_a_corrupt_record_is_moved_aside_and_measured_again_not_retrained(mini, tmp_path, capsys):
    import shutil

    out = Path(shutil.copytree(mini, tmp_path / "copy"))
    rec_path = out / "models" / "sgd-s0.json"
    good = json.loads(rec_path.read_text())
    model_pt = out / good["run_dir"] / "model.pt"
    stamp = model_pt.stat().st_mtime_ns
    rec_path.write_text(rec_path.read_text()[:100])  # a torn file
    # the report refuses it, naming the file and the fix, and writes nothing
    before = snapshot(out)
    assert main(["report", str(out), "--no-static"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{rec_path} is corrupt" in err and "moves the file aside" in err and len(err.splitlines()) == 1
    assert "delete" not in err  # one fix, not two
    assert snapshot(out) == before
    # the study moves it aside, says so, and measures that model again (its training is kept)
    Study(StudyConfig.from_dict(MINI), out, device="cpu", progress=False).run()
    err = capsys.readouterr().err
    aside = list((out / "models").glob("sgd-s0.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].stat().st_size == 100
    assert "was corrupt" in err and aside[0].name in err
    again = json.loads(rec_path.read_text())
    assert set(again["measurements"]) == set(good["measurements"])
    assert again["measurements"]["trace"]["value"]["value"] == pytest.approx(
        good["measurements"]["trace"]["value"]["value"])
    assert model_pt.stat().st_mtime_ns == stamp and not (out / ".dnq.lock").exists()


def test_a_non_finite_measurement_stops_the_study_naming_the_model_and_keeps_the_rest(mini, tmp_path, monkeypatch):
    import shutil

    import landscape.study.measure_curvature as study_mod  # the module whose trace measurement calls hessian_trace

    out = Path(shutil.copytree(mini, tmp_path / "copy"))
    rec_path = out / "models" / "sgd-s0.json"
    rec = json.loads(rec_path.read_text())
    del rec["measurements"]["trace"]
    rec_path.write_text(json.dumps(rec))

    def bad_trace(op, *a, **k):
        raise NonFiniteError("hessian_trace", "loss", 1)

    monkeypatch.setattr(study_mod, "hessian_trace", bad_trace)
    with pytest.raises(StudyError, match=r"model sgd-s0, measurement 'trace': hessian_trace: the loss is NaN or Inf "
                                         r"on batch 1 .* kept in models/sgd-s0.json"):
        Study(StudyConfig.from_dict(MINI), out, device="cpu", progress=False).run()
    kept = json.loads(rec_path.read_text())["measurements"]
    assert "trace" not in kept and "fp" in kept and "eigen" in kept
    assert not (out / ".dnq.lock").exists()  # the lock goes with the study


def test_a_study_that_fails_at_once_leaves_nothing_behind(tmp_path, capsys):
    """A NaN in the first training (a learning rate of 1e30) stops the study before it kept
    anything: no study.json beside empty models/ and runs/, and no folder it made itself."""
    out = tmp_path / "fresh"
    code = main(_study(tmp_path, "--set", "train.lr=1e30", out="fresh"))
    err = capsys.readouterr().err
    assert code == 2 and "training failed" in err, err
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    # a folder the user made is kept (empty, as it was)
    out.mkdir()
    assert main(_study(tmp_path, "--set", "train.lr=1e30", out="fresh")) == 2
    assert out.is_dir() and not any(out.iterdir())


def test_a_study_files_relative_paths_resolve_against_the_file(tmp_path, monkeypatch):
    from landscape.study import load_config

    (tmp_path / "cfgs").mkdir()
    f = tmp_path / "cfgs" / "s.toml"
    f.write_text('name = "x"\ndata = "npz:../data/d.npz"\ndata_root = "roots"\n')
    monkeypatch.chdir(tmp_path / "cfgs")
    for cwd in (tmp_path, tmp_path / "cfgs", Path("/")):
        monkeypatch.chdir(cwd)
        cfg = load_config(config=f)
        assert cfg.data == f"npz:{(tmp_path / 'data' / 'd.npz').resolve()}"
        assert cfg.data_root == str((tmp_path / "cfgs" / "roots").resolve())
    # absolute paths and named datasets are left alone
    f.write_text('name = "x"\ndata = "npz:/abs/d.npz"\n')
    assert load_config(config=f).data == "npz:/abs/d.npz"
    f.write_text('name = "x"\ndata = "cifar10-subset"\n')
    assert load_config(config=f).data == "cifar10-subset"


def test_a_second_study_on_a_folder_in_use_is_refused_naming_the_holder(mini, tmp_path):
    import shutil

    from dnq.rundir import folder_lock

    out = Path(shutil.copytree(mini, tmp_path / "copy"))
    cfg = tmp_path / "mini.json"
    cfg.write_text(json.dumps(MINI))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    env.pop("DNQ_DEBUG", None)
    env.pop("LANDSCAPE_DEBUG", None)
    with folder_lock(out, "landscape study"):
        before = snapshot(tmp_path)
        p = subprocess.run([sys.executable, "-m", "landscape.cli", "study", "--config", str(cfg), "--out", str(out),
                            "--quiet", "--device", "cpu"], capture_output=True, text=True, timeout=300, env=env)
        assert snapshot(tmp_path) == before
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"landscape study: error: {out} is in use by landscape study (pid {os.getpid()} on ")
    # the holder gone, the same command runs (nothing to do: every measurement is recorded)
    p = subprocess.run([sys.executable, "-m", "landscape.cli", "study", "--config", str(cfg), "--out", str(out),
                        "--quiet", "--no-report", "--device", "cpu"], capture_output=True, text=True, timeout=300,
                       env=env)
    assert p.returncode == 0, p.stderr
    assert not (out / ".dnq.lock").exists()


def test_csv_cells_that_look_like_formulas_are_escaped_and_numbers_stay_numbers(tmp_path, monkeypatch):
    import landscape.report.writer as report
    from landscape.report import csv_cell

    assert [csv_cell(v) for v in ("=1+2", "+1", "-x", "@SUM(A1)", "\tx", "\rx", "ok", "a=b", "")] == \
        ["'=1+2", "'+1", "'-x", "'@SUM(A1)", "'\tx", "'\rx", "ok", "a=b", ""]
    assert [csv_cell(v) for v in (-1.5, -3, 0, None, True)] == [-1.5, -3, 0, None, True]

    from tests.landscape.test_report import _rows, _write_study

    rows = _rows(n_configs=3, seeds=(0, 1))
    evil = ["=HYPERLINK(\"http://x\")", "+cmd", "-2+3", "@SUM(A1:A9)", "\tTAB", "plain"]
    for r, name in zip(rows, evil):
        r["model"], r["config"], r["lambda_max"] = name, name, -1.25
    path = _write_study(tmp_path / "study", rows)
    monkeypatch.setattr(report, "load_records",
                        lambda p: [json.loads(f.read_text()) for f in sorted((Path(p) / "models").glob("*.json"))])
    monkeypatch.setattr(report, "summary_rows", lambda records, bits=None: [dict(r["_row"]) for r in records])
    report.build(path, static=False, n_boot=50)
    with open(path / "summary.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert [g["model"] for g in got] == ["'" + n if n[0] in "=+-@\t" else n for n in evil]
    assert [g["config"] for g in got] == [g["model"] for g in got]
    assert all(g["lambda_max"] == "-1.25" for g in got)  # a negative number stays a number
    assert float(got[0]["acc_drop_W4A4"]) == pytest.approx(rows[0]["acc_drop_W4A4"])
    with open(path / "correlations.csv", newline="") as f:
        for row in csv.DictReader(f):
            assert not any(v.startswith(("=", "+", "@")) for v in row.values() if v)


def test_a_rerun_study_leaves_its_up_to_date_report_alone(mini, tmp_path):
    import shutil

    from landscape.report import build

    out = Path(shutil.copytree(mini, tmp_path / "copy"))
    html = build(out, static=False, n_boot=20)
    stamp = html.stat().st_mtime_ns
    assert build(out, static=False, n_boot=20, only_if_changed=True) == html and html.stat().st_mtime_ns == stamp
    meta = json.loads((out / "study.json").read_text())
    meta["updated"] = "2099-01-01T00:00:00"  # every run rewrites this: not an input of the report
    (out / "study.json").write_text(json.dumps(meta))
    build(out, static=False, n_boot=20, only_if_changed=True)
    assert html.stat().st_mtime_ns == stamp
    rec = out / "models" / "sgd-s0.json"
    r = json.loads(rec.read_text())
    r["measurements"]["trace"]["value"]["value"] *= 2  # a changed measurement: rebuilt
    rec.write_text(json.dumps(r))
    build(out, static=False, n_boot=20, only_if_changed=True)
    assert html.stat().st_mtime_ns != stamp
    stamp = html.stat().st_mtime_ns
    build(out, static=False, n_boot=20)  # asked for explicitly (landscape report): always rebuilt
    assert html.stat().st_mtime_ns != stamp


def test_a_rebuilt_report_redraws_only_the_static_figures_whose_data_changed(mini, tmp_path):
    import shutil

    from landscape.report import build

    out = Path(shutil.copytree(mini, tmp_path / "copy"))
    build(out, n_boot=20)
    figs = sorted((out / "figures").glob("*.png"))
    assert figs and (out / "figures" / ".digests.json").is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "figures").iterdir()}
    build(out, n_boot=20)  # nothing changed: no figure drawn again
    assert {p.name: p.stat().st_mtime_ns for p in (out / "figures").iterdir() if p.suffix != ".json"} == \
        {k: v for k, v in stamps.items() if not k.endswith(".json")}
    rec = out / "models" / "sgd-s0.json"
    r = json.loads(rec.read_text())
    surf = r["measurements"]["surface"]["value"]
    surf["loss"] = [[2 * v for v in row] for row in surf["loss"]]  # drawn in figures/model_<id>
    rec.write_text(json.dumps(r))
    (out / "figures" / figs[0].name).unlink()  # a missing file is drawn again too
    build(out, n_boot=20)
    changed = {p.name for p in (out / "figures").iterdir() if p.name not in stamps or
               p.stat().st_mtime_ns != stamps[p.name]}
    assert figs[0].name in changed and any(n.startswith("model_sgd-s0") for n in changed), changed
    assert len(changed - {".digests.json"}) < len(stamps) - 1  # not everything
