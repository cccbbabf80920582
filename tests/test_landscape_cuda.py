"""The instruments on CUDA give the CPU's numbers (run by scripts/gpu_check.sh on a GPU machine;
skipped, with the reason shown, elsewhere)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import landscape
from dnq.models import build_model
from landscape.engines import RevRev

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _case(device):
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32).double()
    model.eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 3, 32, 32, dtype=torch.float64, generator=g), torch.randint(0, 10, (n,), generator=g))
            for n in (16, 7)]
    return copy.deepcopy(model).to(device), [(x.to(device), y.to(device)) for x, y in data]


@pytest.mark.parametrize("method", ["fwd-rev", "rev-rev", "cached"])
def test_products_and_taylor_forms_match_the_cpu(method):
    m_cpu, d_cpu = _case("cpu")
    m_gpu, d_gpu = _case("cuda")
    op_cpu = landscape.HessianOperator(m_cpu, F.cross_entropy, d_cpu, method=method, quadratic="hvp")
    op_gpu = landscape.HessianOperator(m_gpu, F.cross_entropy, d_gpu, method=method, quadratic="taylor")
    V = torch.randn(op_cpu.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    hv_cpu = op_cpu.matmat(V)
    hv_gpu = op_gpu.matmat(V.cuda()).cpu()
    assert float((hv_gpu - hv_cpu).norm() / hv_cpu.norm()) < 1e-8
    q_gpu = op_gpu.quadratic_forms(V.cuda()).cpu()
    assert torch.allclose(q_gpu, (V * hv_cpu).sum(0), rtol=1e-8)


def test_estimators_and_surfaces_match_the_cpu():
    results = {}
    for dev in ("cpu", "cuda"):
        model, data = _case(dev)
        op = landscape.HessianOperator(model, F.cross_entropy, data)
        tr = landscape.hessian_trace(op, 12, method="hutchinson", seed=3)
        eig = landscape.top_eigenvalues(op, k=2, tol=1e-6, seed=0)
        dirs = landscape.random_directions(model, 2, seed=0)
        s2 = landscape.surface_2d(model, F.cross_entropy, data, dirs, steps=3)
        results[dev] = (tr.value, eig.eigenvalues, s2.loss)
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], rel=1e-8)
    assert torch.allclose(torch.as_tensor(results["cuda"][1]), torch.as_tensor(results["cpu"][1]), rtol=1e-6)
    assert torch.allclose(torch.as_tensor(results["cuda"][2]), torch.as_tensor(results["cpu"][2]), rtol=1e-8)


def test_float32_taylor_forms_on_cuda_agree_with_products():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(16 * 16 * 16, 10)).cuda().eval()
    data = [(torch.randn(64, 3, 32, 32, device="cuda"), torch.randint(0, 10, (64,), device="cuda"))]
    op = landscape.HessianOperator(model, F.cross_entropy, data)
    Z = torch.randn(op.dim, 8, device="cuda")
    q = op.quadratic_forms(Z)
    ref = (Z * op.matmat(Z)).sum(0)
    assert op.quadratic in ("taylor", "hvp") and "taylor" not in op.method_errors
    assert torch.allclose(q, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


def test_a_tiny_study_and_report_run_on_cuda(tmp_path):
    import json

    from landscape.report import build
    from landscape.study import Study, StudyConfig

    cfg = {"name": "cuda", "runs": [{"method": "sgd"}, {"method": "dnq", "lambda_max": [0.5, 2.0]}],
           "bits": ["W4A4"], "train": {"epochs": 1},
           "instruments": {"hessian_samples": 256, "trace_matvecs": 6, "eig_k": 2, "density_runs": 1,
                           "density_steps": 8, "block_matvecs": 2, "noise_matvecs": 4, "surface_steps": 5,
                           "slice_steps": 5}}
    recs = Study(StudyConfig.from_dict(cfg), tmp_path / "s", device="cuda", progress=False).run()
    assert len(recs) == 3 and all(len(r["measurements"]) == 9 for r in recs)
    run_cfg = json.loads((tmp_path / "s" / recs[0]["run_dir"] / "config.json").read_text())
    assert run_cfg["resolved_device"].startswith("cuda")
    assert build(tmp_path / "s", static=False).is_file()



def test_products_stay_float32_exact_whatever_the_users_tf32_and_autocast_settings():
    """Hopper's default TF32 convolutions (and TF32 matmuls or a bf16 autocast the user may have on)
    would cost the products digits; the instruments turn them off for their own calls."""
    from landscape.hessian import eval_mode
    from landscape.precision import _restore, _snapshot

    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    ref_op = landscape.HessianOperator(copy.deepcopy(model).double().cuda(), F.cross_entropy,
                                       [(x.double().cuda(), y.cuda())], method="rev-rev", quadratic="hvp")
    V = torch.randn(ref_op.dim, 4, dtype=torch.float64, generator=g).cuda()
    ref = ref_op.matmat(V)  # float64: no TF32 anywhere
    model, x, y, V32 = model.cuda(), x.cuda(), y.cuda(), V.float()
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
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hv = op.matmat(V32).double()
            q = op.quadratic_forms(V32).double()
            assert torch.is_autocast_enabled("cuda") and torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"
        tf32 = unprotected()
    finally:
        _restore(state)

    def rel(a):
        return float((a - ref).norm() / ref.norm())

    q_ref = (V * ref).sum(0)
    err_q = float(((q - q_ref).abs() / q_ref.abs()).max())
    print(f"relative error vs float64: float32 by hand {rel(base):.2e}, instruments {rel(hv):.2e} "
          f"(forms {err_q:.2e}), with TF32 {rel(tf32):.2e}")
    assert rel(hv) <= 2 * rel(base) + 1e-7 and err_q < 1e-3
    assert rel(tf32) > 10 * rel(base)  # TF32 really was on outside: the check above could fail
