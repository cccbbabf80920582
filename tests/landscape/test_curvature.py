"""Curvature instruments against an explicit float64 Hessian from torch.func.hessian."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from landscape import (
    HessianOperator,
    block_traces,
    hessian_trace,
    noise_weighted_trace,
    power_iteration,
    predicted_loss_increase,
    spectral_density,
    top_eigenvalues,
)
from landscape.density import quadrature
from landscape.lanczos import lanczos

CE = nn.functional.cross_entropy


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()


def cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3),
                      nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    m.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            m(torch.randn(16, 1, 6, 6, dtype=torch.float64) * 2 + 0.5)
    return m


def data_for(model):
    g = torch.Generator().manual_seed(1)
    if isinstance(model[0], nn.Conv2d):
        xs = [torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64) for n in (12, 5)]
        k = 3
    else:
        xs = [torch.randn(n, 5, generator=g, dtype=torch.float64) for n in (12, 5)]
        k = 4
    return [(x, torch.randint(0, k, (len(x),), generator=g)) for x in xs]


def explicit_hessian(model, data, names=None):
    """H of the sample-weighted mean loss over all batches, as a dense float64 matrix."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = names or list(params)
    buffers = dict(model.named_buffers())
    shapes = [params[n].shape for n in names]
    flat0 = torch.cat([params[n].reshape(-1) for n in names])
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])

    def f(flat):
        d, i = {}, 0
        for n, s in zip(names, shapes):
            d[n] = flat[i:i + s.numel()].view(s)
            i += s.numel()
        return CE(functional_call(model, {**params, **buffers, **d}, (x,)), y)

    was = model.training
    model.eval()
    try:
        return torch.func.hessian(f)(flat0)
    finally:
        model.train(was)


@pytest.fixture(params=["mlp", "cnn"])
def case(request):
    model = mlp() if request.param == "mlp" else cnn()
    data = data_for(model)
    return model, data, explicit_hessian(model, data)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", ["fwd-rev", "rev-rev", "cached", "auto"])
def test_products_match_the_explicit_hessian(case, method):
    model, data, H = case
    op = HessianOperator(model, CE, data, method=method)
    V = torch.randn(op.dim, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert rel(op.matmat(V), H @ V) < 1e-6
    assert rel(op.matvec(V[:, 0]), H @ V[:, 0]) < 1e-6
    assert op.num_matvecs == 6 and op.method in ("fwd-rev", "rev-rev", "cached")


def test_short_last_batch_is_weighted_by_its_size():
    model = mlp()
    data = data_for(model)  # batches of 12 and 5
    op = HessianOperator(model, CE, data)
    H = explicit_hessian(model, data)  # the mean over all 17 samples
    unweighted = 0.5 * (explicit_hessian(model, data[:1]) + explicit_hessian(model, data[1:]))
    v = torch.randn(op.dim, dtype=torch.float64)
    assert rel(op.matvec(v), H @ v) < 1e-8 and rel(unweighted @ v, H @ v) > 1e-3


def test_parameter_subset_by_glob_is_the_diagonal_block(case):
    model, data, H = case
    op = HessianOperator(model, CE, data, params=["*.weight"])
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    idx = torch.cat([torch.arange(sum(sizes[:i]), sum(sizes[:i + 1]))
                     for i, n in enumerate(names) if n.endswith("weight")])
    Hsub = H[idx][:, idx]
    assert op.names == [n for n in names if n.endswith("weight")] and op.dim == len(idx)
    V = torch.randn(op.dim, 3, dtype=torch.float64)
    assert rel(op.matmat(V), Hsub @ V) < 1e-6
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        HessianOperator(model, CE, data, params=["nothing.*"])


def test_model_is_left_exactly_as_it_was():
    model = cnn()
    model.train()
    model[1].eval()  # a mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = data_for(model)
    op = HessianOperator(model, CE, data)
    op.matmat(torch.randn(op.dim, 2, dtype=torch.float64))
    op.gradient()
    hessian_trace(op, 12, seed=0)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_to_scipy_linear_operator(case):
    model, data, H = case
    lin = HessianOperator(model, CE, data).to_scipy()
    v = np.random.default_rng(0).standard_normal(lin.shape[0])
    np.testing.assert_allclose(lin @ v, H.numpy() @ v, rtol=1e-6, atol=1e-12)
    from scipy.sparse.linalg import eigsh
    top = eigsh(lin, k=1, which="LA", tol=1e-10)[0][0]
    assert abs(top - torch.linalg.eigvalsh(H)[-1].item()) < 1e-6 * abs(top)


def test_gradient_and_loss(case):
    model, data, _ = case
    g, loss = HessianOperator(model, CE, data).gradient()
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    model.eval()
    ref = CE(model(x), y)
    ref_g = torch.autograd.grad(ref, list(model.parameters()))
    assert abs(loss - ref.item()) < 1e-12
    assert rel(g, torch.cat([t.reshape(-1) for t in ref_g])) < 1e-10


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_estimators_are_unbiased_within_their_standard_errors(case, method):
    model, data, H = case
    exact = torch.trace(H).item()
    op = HessianOperator(model, CE, data)
    est = [hessian_trace(op, num_matvecs=24, method=method, seed=s) for s in range(40)]
    values = torch.tensor([e.value for e in est])
    z = (values - exact) / torch.tensor([e.std_error for e in est])
    assert abs(values.mean().item() - exact) < 4 * values.std().item() / math.sqrt(len(values))
    assert 0.5 < z.std().item() < 1.6  # the reported errors are the right size
    assert all(e.num_matvecs == 24 for e in est)
    again = hessian_trace(op, num_matvecs=24, method=method, seed=3)
    assert again.value == est[3].value  # same seed, same number


class DenseOperator:
    """A duck-typed operator for a given symmetric matrix."""

    def __init__(self, H):
        self.H, self.dim, self.dtype, self.device, self.num_matvecs = H, H.shape[0], H.dtype, H.device, 0

    def matmat(self, V):
        self.num_matvecs += V.shape[1] if V.dim() == 2 else 1
        return self.H @ V

    def matvec(self, v):
        return self.matmat(v)


def test_hutchpp_beats_hutchinson_on_a_spectrum_with_outliers():
    g = torch.Generator().manual_seed(0)
    n = 300
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.tensor([400.0, 250.0, 120.0, 80.0, 50.0], dtype=torch.float64),
                     torch.rand(n - 5, generator=g, dtype=torch.float64) * 0.5])
    op = DenseOperator(U @ torch.diag(lam) @ U.T)
    exact = lam.sum().item()
    err = {m: torch.tensor([hessian_trace(op, 30, method=m, seed=s).value - exact for s in range(30)]).pow(2).mean()
           for m in ("hutchinson", "hutch++")}
    assert err["hutch++"] < 0.1 * err["hutchinson"]


def test_target_standard_error_stops_early_and_ignores_the_sign():
    # a Hessian with trace ~0 (indefinite): the running mean crosses zero; the rule must not care
    g = torch.Generator().manual_seed(0)
    A = torch.randn(50, 50, generator=g, dtype=torch.float64)
    H = (A + A.T) / 20  # per-probe standard deviation about 5
    H = H - torch.eye(50, dtype=torch.float64) * torch.trace(H) / 50
    op = DenseOperator(H)
    res = hessian_trace(op, num_matvecs=4000, method="hutchinson", seed=0, target_std_error=0.5, block_size=8)
    assert res.std_error <= 0.5 and res.num_matvecs < 4000
    assert abs(res.value) < 4 * res.std_error


def test_lanczos_top3_match_eigvalsh(case):
    model, data, H = case
    exact = torch.linalg.eigvalsh(H)
    op = HessianOperator(model, CE, data)
    eig = top_eigenvalues(op, k=3, tol=1e-8, seed=0)
    assert eig.converged
    for got, want in zip(eig.eigenvalues, exact.flip(0)[:3].tolist()):
        assert abs(got - want) <= 1e-6 * abs(want)
    for val, vec, r in zip(eig.eigenvalues, eig.eigenvectors, eig.residual_norms):
        v = op.flatten(vec)
        assert abs(v.norm().item() - 1) < 1e-10
        assert (H @ v - val * v).norm().item() == pytest.approx(r, rel=1e-4, abs=1e-12)
        assert vec.keys() == dict(model.named_parameters()).keys()
    sa = top_eigenvalues(op, k=2, tol=1e-8, which="SA", seed=1)
    assert all(abs(a - b) <= 1e-6 * max(abs(b), 1e-3) for a, b in zip(sa.eigenvalues, exact[:2].tolist()))
    lm = top_eigenvalues(op, k=1, tol=1e-8, which="LM", seed=2)
    assert abs(abs(lm.eigenvalues[0]) - exact.abs().max().item()) <= 1e-6 * exact.abs().max().item()


def test_power_iteration_parity(case):
    model, data, H = case
    exact = torch.linalg.eigvalsh(H)[-1].item()
    res = power_iteration(HessianOperator(model, CE, data), k=1, max_iter=500, tol=1e-9, seed=0)
    assert abs(res.eigenvalues[0] - exact) < 1e-4 * abs(exact)


def test_gauss_quadrature_reproduces_moments_exactly():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(40, 40, generator=g, dtype=torch.float64)
    H = (A + A.T) / 8
    v = torch.randn(40, 1, generator=g, dtype=torch.float64)
    a, b, _ = lanczos(lambda X: H @ X, v, 6)
    nodes, weights = quadrature(a[0], b[0])
    u = (v / v.norm())[:, 0]
    for p in range(0, 12):  # exact up to degree 2m - 1 = 11
        want = (u @ torch.linalg.matrix_power(H, p) @ u).item()
        assert (weights * nodes.pow(p)).sum().item() == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_slq_density_integrates_to_one_and_matches_spectral_moments(case):
    model, data, H = case
    lam = torch.linalg.eigvalsh(H)
    op = HessianOperator(model, CE, data)
    runs = 32
    esd = spectral_density(op, num_runs=runs, lanczos_steps=op.dim, seed=0)
    assert esd.weights.sum().item() == pytest.approx(1.0, abs=1e-10)
    assert torch.trapezoid(esd.density, esd.grid).item() == pytest.approx(1.0, abs=1e-3)
    for p in (1, 2):
        # each run estimates v^T H^p v / |v|^2 exactly; the mean over the runs is within a few SE
        want = lam.pow(p).mean().item()
        spread = 2 * math.sqrt(2 * lam.pow(2 * p).sum().item()) / op.dim / math.sqrt(runs)
        assert abs(esd.moment(p) - want) < 4 * spread + 1e-9
    # the Hessian is rank-deficient: every run stops when its Krylov space is exhausted
    assert esd.num_matvecs == runs * esd.nodes.shape[1] and esd.nodes.shape[1] <= op.dim
    assert esd.to_dict()["sigma"] == esd.sigma


def test_block_traces_match_exact_blocks(case):
    model, data, H = case
    op = HessianOperator(model, CE, data)
    res = block_traces(op, num_matvecs=400, seed=0, group="param")
    sl = op.block_slices()
    for n, s in sl.items():
        exact = torch.trace(H[s, s]).item()
        assert abs(res.values[n] - exact) <= 4 * res.std_errors[n] + 1e-9, n
    assert res.total == pytest.approx(sum(res.values.values()), rel=1e-9)
    by_module = block_traces(op, num_matvecs=16, seed=0)
    assert set(by_module.values) == {n.rsplit(".", 1)[0] for n in op.names}


def test_noise_weighted_trace_and_loss_prediction(case):
    model, data, H = case
    op = HessianOperator(model, CE, data)
    g = torch.Generator().manual_seed(3)
    var = {n: torch.rand(p.shape[0], generator=g, dtype=torch.float64) * 1e-2 for n, p in model.named_parameters()}
    mean = {n: torch.randn(p.shape[0], generator=g, dtype=torch.float64) * 1e-2 for n, p in model.named_parameters()}
    from landscape.trace import expand_to_params
    sig = expand_to_params(op, var)
    mu = expand_to_params(op, mean)
    exact = torch.trace(H * sig[None, :]).item()  # Tr(H diag(sig))
    tr = noise_weighted_trace(op, var, num_matvecs=200, seed=0)
    assert abs(tr.value - exact) <= 4 * tr.std_error
    pred = predicted_loss_increase(op, var, mean, num_matvecs=200, seed=0)
    grad, _ = op.gradient()
    want = (grad @ mu).item() + 0.5 * ((mu @ H @ mu).item() + tr.value)
    assert pred.predicted == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="broadcast"):
        noise_weighted_trace(op, {op.names[0]: torch.ones(99, dtype=torch.float64)})


def test_results_serialize_and_print(case):
    model, data, _ = case
    op = HessianOperator(model, CE, data)
    tr = hessian_trace(op, 12, seed=0)
    d = tr.to_dict()
    assert d["value"] == tr.value and "samples" not in d and "TraceResult(value=" in repr(tr)
    eig = top_eigenvalues(op, k=1, seed=0)
    assert "eigenvectors" not in eig.to_dict() and isinstance(eig.to_dict()["eigenvalues"], list)


def test_bad_arguments():
    model = mlp()
    data = data_for(model)
    op = HessianOperator(model, CE, data)
    with pytest.raises(ValueError, match="hutchinson, hutch\\+\\+"):
        hessian_trace(op, method="girard")
    with pytest.raises(ValueError, match="k must be"):
        top_eigenvalues(op, k=0)
    with pytest.raises(ValueError, match="LA, SA, LM"):
        top_eigenvalues(op, which="BE")
    with pytest.raises(ValueError, match="length"):
        op.matvec(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown method"):
        HessianOperator(model, CE, data, method="fast")


def test_cross_check_against_pyhessian():
    pyhessian = pytest.importorskip("pyhessian", reason="pyhessian is a dev extra")
    import copy

    model = mlp().float()
    x = torch.cat([b[0] for b in data_for(model)]).float()
    y = torch.cat([b[1] for b in data_for(model)])
    ours_op = HessianOperator(model, CE, (x, y))
    # power iteration finds the largest-magnitude eigenvalues
    ours = top_eigenvalues(ours_op, k=2, tol=1e-6, seed=0, which="LM").eigenvalues
    ours_tr = hessian_trace(ours_op, num_matvecs=300, method="hutchinson", seed=0)
    torch.manual_seed(0)  # PyHessian draws from the global generator, puts the model in eval mode
    top, _ = pyhessian.hessian(copy.deepcopy(model), CE, data=(x, y), cuda=False).eigenvalues(
        maxIter=500, tol=1e-6, top_n=2)
    for a, b in zip(ours, top):
        assert abs(a - b) < 1e-3 * abs(a)
    samples = pyhessian.hessian(copy.deepcopy(model), CE, data=(x, y), cuda=False).trace(maxIter=300, tol=1e-9)
    ph_se = np.std(samples, ddof=1) / math.sqrt(len(samples))
    assert abs(np.mean(samples) - ours_tr.value) < 5 * math.hypot(ours_tr.std_error, ph_se)
