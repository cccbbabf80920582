"""Each engine of HessianOperator alone against a dense float64 Hessian from torch.func, the
planner's recorded choices, and the data cases that used to fail: pytree (dict) inputs,
ignore_index first met after batch 1, summed losses, data that changes between passes."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import landscape
import landscape.hessian
from landscape import HessianOperator, hessian_trace, spectral_density, top_eigenvalues
from landscape.engines import CachedGraph, FwdRev, ProductForms, RevRev, TaylorForms
from landscape.operator import DataChangedError, ReductionWarning

CE = F.cross_entropy


def cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3),
                      nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    m.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            m(torch.randn(16, 1, 6, 6, dtype=torch.float64) * 2 + 0.5)
    return m.eval()


def batches(sizes=(12, 5, 9), classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g))
            for n in sizes]


def dense(model, data, batch_loss, weights):
    """sum_b weights[b] * Hess(batch_loss(outputs_b, y_b)) over all parameters, float64."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    names = list(params)
    shapes = [params[n].shape for n in names]
    flat0 = torch.cat([params[n].reshape(-1) for n in names])

    def f(flat):
        d, i = {}, 0
        for n, s in zip(names, shapes):
            d[n] = flat[i:i + s.numel()].view(s)
            i += s.numel()
        total = 0
        for (x, y), w in zip(data, weights):
            total = total + w * batch_loss(functional_call(model, {**params, **buffers, **d}, (x,)), y)
        return total

    return torch.func.hessian(f)(flat0)


def mean_hessian(model, data, loss=CE):
    n = sum(len(b[1]) for b in data)
    return dense(model, data, loss, [len(b[1]) / n for b in data])


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("engine", ["fwd-rev", "rev-rev", "cached"])
def test_each_product_engine_alone_against_the_dense_hessian(engine):
    model, data = cnn(), batches()
    H = mean_hessian(model, data)
    op = HessianOperator(model, CE, data, engine=engine)
    V = torch.randn(op.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert rel(op.matmat(V), H @ V) < 1e-10
    choice = op.planner.get("product")
    assert (choice.engine, choice.how) == (engine, "requested")
    assert op.counts == {f"product:{engine}": 3}
    # the engine class alone, on one batch, against that batch's dense Hessian
    cls = {"fwd-rev": FwdRev, "rev-rev": RevRev, "cached": CachedGraph}[engine]
    x, y = data[1]
    Hb = dense(model, [data[1]], CE, [1.0])
    HV, loss = cls().products(op, 1, x, y, op.unflatten(V), op.frozen())
    assert rel(op.to_block(HV), Hb @ V) < 1e-10
    with torch.no_grad():
        want = float(CE(model(x), y))
    assert float(loss.detach()) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("engine", ["taylor", "hvp"])
def test_each_quadratic_engine_alone_against_the_dense_hessian(engine):
    model, data = cnn(), batches()
    H = mean_hessian(model, data)
    op = HessianOperator(model, CE, data, engine=engine)
    Z = torch.randn(op.dim, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    truth = torch.einsum("ik,ij,jk->k", Z, H, Z)
    assert rel(op.quadratic_forms(Z), truth) < 1e-10
    assert op.quadratic == engine and op.planner.get("quadratic").how == "requested"
    assert op.counts[f"quadratic:{engine}"] == 5
    x, y = data[0]
    Hb = dense(model, [data[0]], CE, [1.0])
    V = op.unflatten(Z)
    eng = TaylorForms(op) if engine == "taylor" else ProductForms(FwdRev())
    q, _ = eng.forms(op, 0, x, y, V, op.frozen())
    assert rel(q, torch.einsum("ik,ij,jk->k", Z, Hb, Z)) < 1e-10


def test_the_automatic_choice_is_recorded_per_operator_and_in_every_result():
    assert not hasattr(landscape.hessian, "_CHOICES")  # no process-wide cache
    model, data = cnn(), batches()
    op = HessianOperator(model, CE, data)
    tr = hessian_trace(op, num_matvecs=8, method="hutchinson", seed=0)
    q = op.planner.get("quadratic")
    assert q.how in ("timing", "rule") and q.engine in ("taylor", "hvp")
    if q.how == "timing":
        assert set(q.timings) == {"taylor", "hvp"}
    assert tr.engines == {f"quadratic:{q.engine}": 8}
    eig = top_eigenvalues(op, k=1, tol=1e-3, seed=0)
    p = op.planner.get("product")
    assert p.how == "timing" and p.engine in ("fwd-rev", "rev-rev", "cached") and p.timings
    assert set(eig.engines) == {f"product:{p.engine}"} and eig.engines[f"product:{p.engine}"] == eig.num_matvecs
    d = spectral_density(op, num_runs=1, lanczos_steps=4, seed=0)
    assert sum(d.engines.values()) == d.num_matvecs == 4
    # a second operator makes its own choice (its planner holds nothing yet)
    op2 = HessianOperator(model, CE, batches(seed=5))
    assert op2.planner.get("product") is None and op2.planner.get("quadratic") is None
    assert op.planner.to_dict()["product"]["engine"] == p.engine


class DictNet(nn.Module):
    """``forward(self, batch)`` with ``batch["x"]``, as in many codebases."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, batch):
        return self.b(torch.tanh(self.a(batch["x"]) * batch["scale"]))


def dict_data():
    g = torch.Generator().manual_seed(3)
    out = []
    for n in (40, 7):
        x = {"x": torch.randn(n, 4, generator=g, dtype=torch.float64),
             "scale": torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.5}
        out.append((x, torch.randint(0, 3, (n,), generator=g)))
    return out


@pytest.mark.parametrize("method", ["auto", "rev-rev", "fwd-rev"])
def test_dict_inputs_with_every_engine(method):
    model, data = DictNet().double(), dict_data()
    H = mean_hessian(model, data)
    op = HessianOperator(model, CE, data, method=method)
    Z = torch.randn(op.dim, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert rel(op.matmat(Z), H @ Z) < 1e-10
    assert rel(op.quadratic_forms(Z), torch.einsum("ik,ij,jk->k", Z, H, Z)) < 1e-10
    tr = hessian_trace(op, num_matvecs=12, method="hutch++", seed=0)
    assert abs(tr.value - float(torch.trace(H))) < 5 * tr.std_error + 1e-8 * abs(float(torch.trace(H)))
    assert "taylor" in op.method_errors and "tensor input" in op.method_errors["taylor"]
    assert op.quadratic == "hvp"
    # one (dict, targets) pair is one batch
    one = HessianOperator(model, CE, data[0], method=method)
    assert rel(one.matmat(Z), mean_hessian(model, data[:1]) @ Z) < 1e-10


def test_ignore_index_first_met_after_batch_one_falls_back_per_batch():
    model = cnn()
    data = batches(sizes=(10, 10, 10), classes=3)
    data[2][1][:4] = 0  # class 0 is ignored: present only from batch 2 on...
    for _x, y in data[:2]:
        y[y == 0] = 1  # ...not in batches 0 and 1
    loss = nn.CrossEntropyLoss(ignore_index=0)
    H = mean_hessian(model, data, loss)
    op = HessianOperator(model, loss, data, engine="taylor")
    Z = torch.randn(op.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert rel(op.quadratic_forms(Z), torch.einsum("ik,ij,jk->k", Z, H, Z)) < 1e-10
    assert op.counts["fallback:taylor->hvp"] == 1 and op.counts["quadratic:taylor"] == 3
    # the automatic choice too (batch 0 has no ignored target, so Taylor mode may be chosen)
    auto = HessianOperator(model, loss, data)
    tr = hessian_trace(auto, num_matvecs=6, method="hutchinson", seed=1)
    assert tr.value == pytest.approx(sum(hessian_trace(op, num_matvecs=6, method="hutchinson", seed=1).samples) / 6,
                                     rel=1e-9)


def sum_ce(out, y):
    return F.cross_entropy(out, y, reduction="sum")


@pytest.mark.parametrize("how", ["detected", "module", "given"])
def test_a_summed_loss_gives_the_hessian_of_the_sum(how):
    model, data = cnn(), batches(sizes=(12, 5, 9))
    H = dense(model, data, sum_ce, [1.0, 1.0, 1.0])
    loss, kw = {"detected": (sum_ce, {}), "module": (nn.CrossEntropyLoss(reduction="sum"), {}),
                "given": (sum_ce, {"reduction": "sum"})}[how]
    op = HessianOperator(model, loss, data, **kw)
    Z = torch.randn(op.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    if how == "detected":  # inferred from the data: said so
        with pytest.warns(ReductionWarning, match="taken as a sum.*sum of its halves"):
            op.prepare()
    assert rel(op.matmat(Z), H @ Z) < 1e-10
    assert rel(op.quadratic_forms(Z), torch.einsum("ik,ij,jk->k", Z, H, Z)) < 1e-10
    assert op.reduction == "sum" and op.planner.get("reduction").how == {"given": "requested"}.get(how, "rule")
    g, value = op.gradient()
    assert value == pytest.approx(sum(float(sum_ce(model(x), y)) for x, y in data), rel=1e-10)
    # the mean of the same loss is detected as a mean, and differs by the sample count
    mean_op = HessianOperator(model, CE, data)
    assert rel(mean_op.matmat(Z) * sum(len(b[1]) for b in data), H @ Z) < 1e-10
    assert mean_op.reduction == "mean"


def test_auto_reduction_never_decides_on_a_one_sample_batch():
    """A summed loss whose first batch holds one sample was taken as a mean (84% off): the
    test now looks further, warns with its reason, and asks for reduction= when it cannot tell."""
    model, data = cnn(), batches(sizes=(1, 6, 5))
    H = dense(model, data, sum_ce, [1.0, 1.0, 1.0])
    op = HessianOperator(model, lambda out, y: F.cross_entropy(out, y, reduction="sum"), data)
    Z = torch.randn(op.dim, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with pytest.warns(ReductionWarning, match="batch 1's loss is the sum"):
        got = op.matmat(Z)
    assert op.reduction == "sum" and rel(got, H @ Z) < 1e-10
    singles = batches(sizes=(1, 1, 1))
    with pytest.raises(ValueError, match="one sample.*pass reduction='mean' or reduction='sum'"):
        HessianOperator(model, sum_ce, singles).matmat(Z)
    assert HessianOperator(model, sum_ce, singles, reduction="sum").matmat(Z).shape == Z.shape
    with pytest.raises(ValueError, match="neither the mean nor the sum"):
        HessianOperator(model, lambda out, y: F.cross_entropy(out, y) ** 2, data).matmat(Z)


def test_declared_reductions_are_read_without_inference(recwarn):
    import functools

    model, data = cnn(), batches(sizes=(1, 6, 5))
    for loss, want in ((F.cross_entropy, "mean"), (functools.partial(F.cross_entropy, reduction="sum"), "sum"),
                       (nn.CrossEntropyLoss(reduction="sum"), "sum")):
        op = HessianOperator(model, loss, data)
        assert op.reduction == want and op.planner.get("reduction").how == "rule"
    assert not [w for w in recwarn if issubclass(w.category, ReductionWarning)]
    with pytest.raises(ValueError, match="contradicts cross_entropy's default"):
        HessianOperator(model, F.cross_entropy, data, reduction="sum")


def test_reduction_arguments_are_validated():
    model, data = cnn(), batches()
    with pytest.raises(ValueError, match="contradicts the loss module"):
        HessianOperator(model, nn.CrossEntropyLoss(reduction="sum"), data, reduction="mean")
    with pytest.raises(ValueError, match="reduction='none'"):
        HessianOperator(model, nn.CrossEntropyLoss(reduction="none"), data)
    with pytest.raises(ValueError, match="unknown reduction"):
        HessianOperator(model, CE, data, reduction="avg")
    with pytest.raises(ValueError, match="unknown engine"):
        HessianOperator(model, CE, data, engine="jvp")
    with pytest.raises(ValueError, match="contradicts"):
        HessianOperator(model, CE, data, engine="taylor", quadratic="hvp")


class Shuffling:
    """A re-iterable that yields the same samples in a new order on every pass."""

    def __init__(self, data, drop_last=False):
        self.x = torch.cat([b[0] for b in data])
        self.y = torch.cat([b[1] for b in data])
        self.g = torch.Generator().manual_seed(0)
        self.drop_last = drop_last

    def __iter__(self):
        perm = torch.randperm(len(self.y), generator=self.g)
        stop = len(perm) - len(perm) % 8 if self.drop_last else len(perm)
        for i in range(0, stop, 8):
            j = perm[i:i + 8]
            yield self.x[j], self.y[j]


@pytest.mark.parametrize("engine", ["fwd-rev", "rev-rev", "cached"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_data_that_changes_between_passes_is_refused(engine, drop_last):
    model = cnn()
    op = HessianOperator(model, CE, Shuffling(batches(), drop_last), engine=engine)
    v = torch.randn(op.dim, dtype=torch.float64)
    op.matvec(v)
    with pytest.raises(DataChangedError, match="shuffle=False"):
        op.matvec(v)


def test_an_exhausted_iterator_is_refused():
    with pytest.raises(TypeError, match="iterator"):
        HessianOperator(cnn(), CE, iter(batches()), engine="rev-rev")


def test_the_same_data_in_new_tensors_passes_the_fingerprint():
    model, data = cnn(), batches()

    class Copies:
        def __iter__(self):
            return iter([(x.clone(), y.clone()) for x, y in data])

    op = HessianOperator(model, CE, Copies(), engine="rev-rev")
    v = torch.randn(op.dim, dtype=torch.float64)
    assert torch.equal(op.matvec(v), op.matvec(v))
