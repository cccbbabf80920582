"""What the instruments promise a user about their own reliability: warnings (or errors) when an
iterative instrument stops short, bounded memory, progress that can be silenced, target errors
instead of budgets, and results whose repr never prints a tensor."""

import warnings

import pytest
import torch

import landscape
import landscape._progress
from landscape import (
    ConvergenceError,
    ConvergenceWarning,
    HessianOperator,
    block_traces,
    hessian_trace,
    noise_weighted_trace,
    power_iteration,
    predicted_loss_increase,
    spectral_density,
    top_eigenvalues,
)
from landscape.lanczos import thick_restart_lanczos
from tests.landscape.test_curvature import CE, cnn, data_for, explicit_hessian


@pytest.fixture(scope="module")
def dense():
    model = cnn()
    data = data_for(model)
    H = explicit_hessian(model, data)
    return model, data, H, torch.linalg.eigvalsh(H)


def test_thick_restart_matches_the_dense_spectrum_in_any_window(dense):
    model, data, H, ev = dense
    want = ev.flip(0)[:4]
    for window in (6, 9, 400):
        run = thick_restart_lanczos(lambda v: H @ v, torch.randn(H.shape[0], dtype=torch.float64,
                                                                 generator=torch.Generator().manual_seed(0)),
                                    4, tol=1e-10, max_steps=H.shape[0], window=window)
        assert run["converged"], window
        assert torch.allclose(run["theta"], want, rtol=1e-9), window
        assert run["peak_vectors"] <= window
        assert (run["restarts"] > 0) == (window < 100)
    # smallest algebraic and largest magnitude too, inside a small window
    for which, want in (("SA", ev[:2]), ("LM", ev[ev.abs().argsort(descending=True)][:2])):
        run = thick_restart_lanczos(lambda v: H @ v, torch.ones(H.shape[0], dtype=torch.float64), 2, which=which,
                                    tol=1e-10, max_steps=2000, window=8)
        assert run["converged"] and torch.allclose(run["theta"], want, rtol=1e-8), which


def test_top_eigenvalues_within_a_memory_budget_equals_the_unbounded_run(dense):
    model, data, H, ev = dense
    op = HessianOperator(model, CE, data)
    free = top_eigenvalues(op, k=3, tol=1e-8, seed=0, progress=False)
    small = top_eigenvalues(op, k=3, tol=1e-8, seed=0, memory_budget=7 * op.dim * 8, progress=False)
    assert free.reorthogonalization == "full" and small.reorthogonalization == "thick-restart"
    assert small.basis_bytes <= 7 * op.dim * 8 < free.basis_bytes
    for res in (free, small):
        assert res.converged
        got = torch.tensor(res.eigenvalues, dtype=torch.float64)
        torch.testing.assert_close(got, ev.flip(0)[:3], rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="memory_budget.*needs at least 5"):
        top_eigenvalues(op, k=3, memory_budget=3 * op.dim * 8)
    with pytest.raises(ValueError, match="memory_budget must be a positive number"):
        top_eigenvalues(op, k=3, memory_budget=-1)


def test_a_non_converged_eigensolve_warns_naming_its_residuals_or_raises_when_strict(dense):
    model, data, _, _ = dense
    op = HessianOperator(model, CE, data)
    with pytest.warns(ConvergenceWarning, match=r"did not converge: relative residuals .* after 4 Lanczos steps"):
        res = top_eigenvalues(op, k=3, tol=1e-12, max_iter=4, progress=False)
    assert not res.converged and max(res.relative_residuals) > 1e-12
    with pytest.raises(ConvergenceError, match="relative residuals"):
        top_eigenvalues(op, k=3, tol=1e-12, max_iter=4, strict=True, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged result is silent
        assert top_eigenvalues(op, k=2, tol=1e-6, progress=False).converged
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        power_iteration(op, k=1, max_iter=2, tol=1e-14, progress=False)


def test_slq_chooses_local_reorthogonalization_when_the_basis_does_not_fit(dense):
    model, data, H, ev = dense
    op = HessianOperator(model, CE, data)
    full = spectral_density(op, num_runs=2, lanczos_steps=12, seed=0, progress=False)
    local = spectral_density(op, num_runs=2, lanczos_steps=12, seed=0, memory_budget=10 * op.dim * 8, progress=False)
    assert full.reorthogonalization == "full" and local.reorthogonalization == "local"
    assert local.basis_bytes <= 10 * op.dim * 8 < full.basis_bytes
    # the same probes: the quadrature's low moments agree (Gauss quadrature is exact to degree 2m - 1)
    for p in (1, 2, 3):
        assert local.moment(p) == pytest.approx(full.moment(p), rel=1e-8)
    with pytest.raises(ValueError, match="unknown reorth"):
        spectral_density(op, reorth="partial")


def test_trace_to_a_target_error_instead_of_a_budget(dense):
    model, data, H, _ = dense
    op = HessianOperator(model, CE, data)
    exact = float(torch.trace(H))
    for method, target in (("hutchinson", 0.3), ("hutch++", 0.01)):
        tr = hessian_trace(op, method=method, target_rel_error=target, seed=0, block_size=4, progress=False)
        assert tr.std_error <= target * abs(tr.value), method
        assert tr.num_matvecs < 1024 and abs(tr.value - exact) <= 5 * tr.std_error, method
    assert hessian_trace(op, method="hutchinson", seed=0, progress=False).num_matvecs == 64  # the default budget
    with pytest.warns(ConvergenceWarning, match="relative standard error 1e-06 not reached within num_matvecs=8"):
        hessian_trace(op, 8, method="hutchinson", target_rel_error=1e-6, progress=False)
    with pytest.raises(ConvergenceError):
        hessian_trace(op, 8, method="hutchinson", target_std_error=1e-9, strict=True, progress=False)
    with pytest.raises(ValueError, match="target_rel_error must be a finite number > 0"):
        hessian_trace(op, target_rel_error=0)
    var = {n: torch.full_like(p, 0.01) for n, p in model.named_parameters()}
    nw = noise_weighted_trace(op, var, target_rel_error=0.3, block_size=4, progress=False)
    assert nw.std_error <= 0.3 * abs(nw.value) and nw.num_matvecs < 1024


def test_progress_bars_show_on_long_runs_and_are_silenced_by_progress_false(dense, capsys, monkeypatch):
    model, data, _, _ = dense
    monkeypatch.setattr(landscape._progress, "DELAY", 0.0)  # every run is "long"
    calls = {
        "hessian_trace": lambda op, p: hessian_trace(op, 6, progress=p),
        "top_eigenvalues": lambda op, p: top_eigenvalues(op, 1, progress=p),
        "spectral_density": lambda op, p: spectral_density(op, 1, 4, progress=p),
        "block_traces": lambda op, p: block_traces(op, 4, progress=p),
        "surface_1d": lambda op, p: landscape.surface_1d(model, CE, data, landscape.random_directions(model, 1)[0],
                                                         steps=3, progress=p),
    }
    for name, call in calls.items():
        op = HessianOperator(model, CE, data)
        call(op, True)
        assert name in capsys.readouterr().err, name
        call(op, False)
        assert capsys.readouterr().err == "", name


def test_every_result_repr_is_short_and_prints_no_tensor(dense):
    model, data, _, _ = dense
    op = HessianOperator(model, CE, data)
    var = {n: torch.full_like(p, 0.01) for n, p in model.named_parameters()}
    dirs = landscape.random_directions(model, 2)
    results = [hessian_trace(op, 6, progress=False), top_eigenvalues(op, 3, progress=False),
               spectral_density(op, 2, 8, progress=False), block_traces(op, 4, progress=False),
               predicted_loss_increase(op, var, var, num_matvecs=4, progress=False),
               power_iteration(op, 2, max_iter=200, progress=False),
               landscape.surface_2d(model, CE, data, dirs, steps=5, progress=False),
               landscape.layer_sensitivity(op, {"7.weight": {4: (torch.zeros(3), torch.full((3,), 1e-4))}},
                                           num_matvecs=4)]
    for r in results:
        text = repr(r)
        assert "tensor(" not in text and "array(" not in text, text
        assert len(text) < 1500, (type(r).__name__, len(text))


def test_lanczos_in_float32_within_a_budget_on_each_device(device):  # the device fixture: cpu, cuda
    """The float64 accumulation and the budgeted basis where the vectors live (a 2M-parameter
    diagonal Hessian, float32: float32 sums at this length are off by ~1e-5 relative)."""
    from tests.landscape.scale_operators import diagonal_case

    model, loss_fn, (x, y), values, trace = diagonal_case(2_000_000)
    model, data = model.to(device), (x.to(device), y.to(device))
    op = HessianOperator(model, loss_fn, data, reduction="mean", method="rev-rev")
    eig = top_eigenvalues(op, k=3, seed=0, memory_budget=8 * op.dim * 4, progress=False)
    assert eig.converged and eig.restarts >= 1
    for got, want in zip(eig.eigenvalues, values[:3].tolist()):
        assert abs(got - want) <= 1e-5 * want
    for reorth in ("full", "local"):
        esd = spectral_density(op, num_runs=2, lanczos_steps=5, seed=0, reorth=reorth, progress=False)
        for p in (1, 2, 3):
            assert esd.moment(p) == pytest.approx(float((values ** p).mean()), rel=1e-5), (reorth, p)
    tr = hessian_trace(op, num_matvecs=2, method="hutchinson", progress=False)
    assert tr.value == pytest.approx(trace, rel=1e-6)
