"""The instruments on each device (the ``device`` fixture): on CUDA they give the CPU's numbers
(``pytest -m cuda``, run by scripts/gpu_check.sh on a GPU machine); the CPU variants run in CI
with the same assertions, against an independent reference where CUDA is compared with the CPU
(another product engine, another surface engine). The CPU variants take cnn-digits (three
convolutions with BatchNorm, a max-pool, a linear head) on 3x8x8 images where CUDA takes resnet20
on 32x32 ones."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import landscape
from dnq.models import build_model
from landscape.engines import RevRev

MODEL = {"cpu": ("cnn-digits", 8), "cuda": ("resnet20", 32)}  # (model, image size) per device
ENGINES = ["fwd-rev", "rev-rev", "cached"]
# the CPU variants compare a product engine with another one (CUDA: with the same engine on the CPU)
OTHER = {"fwd-rev": "rev-rev", "rev-rev": "fwd-rev", "cached": "rev-rev"}


def _case(where, device):
    """The float64 model of ``device``'s variant and two batches (16 and 7 images), on ``where``."""
    torch.manual_seed(0)
    name, size = MODEL[device]
    model = build_model(name, 10, 3, size).double()
    model.eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 3, size, size, dtype=torch.float64, generator=g),
             torch.randint(0, 10, (n,), generator=g)) for n in (16, 7)]
    return copy.deepcopy(model).to(where), [(x.to(where), y.to(where)) for x, y in data]


@pytest.mark.parametrize("method", ENGINES)
def test_products_and_taylor_forms_match_a_reference(device, method):
    """Float64 products and Taylor-mode forms on the device against Hessian-vector products on the
    CPU: CUDA against the same engine, the CPU against another engine (:data:`OTHER`)."""
    m_ref, d_ref = _case("cpu", device)
    m_dev, d_dev = _case(device, device)
    ref_method = method if device == "cuda" else OTHER[method]
    op_ref = landscape.HessianOperator(m_ref, F.cross_entropy, d_ref, method=ref_method, quadratic="hvp")
    op_dev = landscape.HessianOperator(m_dev, F.cross_entropy, d_dev, method=method, quadratic="taylor")
    V = torch.randn(op_ref.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    hv_ref = op_ref.matmat(V)
    hv_dev = op_dev.matmat(V.to(device)).cpu()
    assert float((hv_dev - hv_ref).norm() / hv_ref.norm()) < 1e-8
    q_dev = op_dev.quadratic_forms(V.to(device)).cpu()
    assert torch.allclose(q_dev, (V * hv_ref).sum(0), rtol=1e-8)


def test_estimators_and_surfaces_match_a_reference(device):
    """Trace, top eigenvalues and a 2-D surface (float64) on the device against the CPU's. CUDA:
    the same calls on the CPU. CPU: the device's calls pin the Taylor forms and forward-over-reverse
    products, the reference takes reverse-over-reverse products, Hessian-vector forms and the
    surface point by point on a plain copy of the model (``chunk_size=1``)."""
    if device == "cuda":
        cases = {"dev": ("cuda", {}, "auto"), "ref": ("cpu", {}, "auto")}
    else:
        cases = {"dev": ("cpu", {"method": "fwd-rev", "quadratic": "taylor"}, "auto"),
                 "ref": ("cpu", {"method": "rev-rev", "quadratic": "hvp"}, 1)}
    results, surface_engines = {}, {}
    for name, (where, engines, chunk) in cases.items():
        model, data = _case(where, device)
        op = landscape.HessianOperator(model, F.cross_entropy, data, **engines)
        tr = landscape.hessian_trace(op, 12, method="hutchinson", seed=3)
        eig = landscape.top_eigenvalues(op, k=2, tol=1e-6, seed=0)
        dirs = landscape.random_directions(model, 2, seed=0)
        s2 = landscape.surface_2d(model, F.cross_entropy, data, dirs, steps=3, chunk_size=chunk, progress=False)
        results[name], surface_engines[name] = (tr.value, eig.eigenvalues, s2.loss), s2.engine["surface"]["engine"]
    if device == "cpu":  # two evaluation paths: the folded model (BatchNorm folded) and a plain copy
        assert surface_engines == {"dev": "folded", "ref": "copy"}, surface_engines
    assert results["dev"][0] == pytest.approx(results["ref"][0], rel=1e-8)
    assert torch.allclose(torch.as_tensor(results["dev"][1]), torch.as_tensor(results["ref"][1]), rtol=1e-6)
    assert torch.allclose(torch.as_tensor(results["dev"][2]), torch.as_tensor(results["ref"][2]), rtol=1e-8)


def test_float32_taylor_forms_agree_with_products(device):
    """The automatic engines' float32 forms against the products (the CPU variant on 8x8 images)."""
    torch.manual_seed(0)
    size = MODEL[device][1]
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(16 * (size // 2) ** 2, 10)).to(device).eval()
    data = [(torch.randn(64, 3, size, size, device=device), torch.randint(0, 10, (64,), device=device))]
    op = landscape.HessianOperator(model, F.cross_entropy, data)
    Z = torch.randn(op.dim, 8, device=device)
    q = op.quadratic_forms(Z)
    ref = (Z * op.matmat(Z)).sum(0)
    assert op.quadratic in ("taylor", "hvp") and "taylor" not in op.method_errors
    assert torch.allclose(q, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


def test_a_tiny_study_and_report_run(tmp_path, device):
    """Every measurement of every model (their names: ``measurement_keys``) and the report. The CPU
    variant trains one model (tests/landscape/test_study.py runs a larger study on the CPU)."""
    import json

    from landscape.report import build
    from landscape.study import Study, StudyConfig, measurement_keys

    runs = [{"method": "sgd"}, {"method": "dnq", "lambda_max": [0.5, 2.0]}] if device == "cuda" else \
        [{"method": "dnq", "lambda_max": [2.0]}]
    cfg = StudyConfig.from_dict({
        "name": device, "runs": runs, "bits": ["W4A4"], "train": {"epochs": 1},
        "instruments": {"hessian_samples": 256, "trace_matvecs": 6, "eig_k": 2, "density_runs": 1,
                        "density_steps": 8, "block_matvecs": 2, "noise_matvecs": 4, "surface_steps": 5,
                        "slice_steps": 5}})
    recs = Study(cfg, tmp_path / "s", device=device, progress=False).run()
    expected = set(measurement_keys(cfg, device))
    assert len(recs) == len(cfg.expand()) == (3 if device == "cuda" else 1)
    assert all(set(r["measurements"]) == expected for r in recs), [sorted(r["measurements"]) for r in recs]
    run_cfg = json.loads((tmp_path / "s" / recs[0]["run_dir"] / "config.json").read_text())
    assert run_cfg["resolved_device"].startswith(device)
    assert build(tmp_path / "s", static=False).is_file()


def test_products_stay_float32_exact_whatever_the_users_tf32_and_autocast_settings(device):
    """Hopper's default TF32 convolutions (and TF32 matmuls or a bf16 autocast the user may have on)
    would cost the products digits; the instruments turn them off for their own calls. On the CPU
    the TF32 switches do nothing, and the bf16 autocast is what would cost the digits: there the
    unprotected product that must lose them is taken under it."""
    from dnq_landscape_common.precision import _restore, _snapshot
    from landscape.hessian import eval_mode

    torch.manual_seed(0)
    name, size = MODEL[device]
    model = build_model(name, 10, 3, size).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, size, size, generator=g), torch.randint(0, 10, (64,), generator=g)
    ref_op = landscape.HessianOperator(copy.deepcopy(model).double().to(device), F.cross_entropy,
                                       [(x.double().to(device), y.to(device))], method="rev-rev", quadratic="hvp")
    V = torch.randn(ref_op.dim, 4, dtype=torch.float64, generator=g).to(device)
    ref = ref_op.matmat(V)  # float64: no TF32 anywhere
    model, x, y, V32 = model.to(device), x.to(device), y.to(device), V.float()
    op = landscape.HessianOperator(model, F.cross_entropy, [(x, y)], method="rev-rev", quadratic="taylor")

    def unprotected():  # the same product, outside the instruments' scope
        with eval_mode(model):
            return op.to_block(RevRev().products(op, 0, x, y, op.unflatten(V32), op.frozen())[0]).double()

    state = _snapshot()
    try:
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 as it should be, set here by hand
        torch.backends.cudnn.allow_tf32 = False
        base = unprotected()
        torch.backends.cuda.matmul.allow_tf32 = True  # the user's settings
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        with torch.autocast(device, dtype=torch.bfloat16):
            hv = op.matmat(V32).double()
            q = op.quadratic_forms(V32).double()
            assert torch.is_autocast_enabled(device) and torch.backends.cudnn.allow_tf32
            if device == "cpu":
                lossy = unprotected()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"
        if device == "cuda":
            lossy = unprotected()
    finally:
        _restore(state)

    def rel(a):
        return float((a - ref).norm() / ref.norm())

    q_ref = (V * ref).sum(0)
    err_q = float(((q - q_ref).abs() / q_ref.abs()).max())
    print(f"relative error vs float64: float32 by hand {rel(base):.2e}, instruments {rel(hv):.2e} "
          f"(forms {err_q:.2e}), with the user's settings {rel(lossy):.2e}")
    assert rel(hv) <= 2 * rel(base) + 1e-7 and err_q < 1e-3
    assert rel(lossy) > 10 * rel(base)  # the user's settings really cost digits outside: the check above could fail
