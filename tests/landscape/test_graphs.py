"""Products without host reads and from CUDA graphs (issue 22).

- a pass of products reads the host once (its NaN/Inf flags and the data fingerprint together),
  whatever the number of batches, and nothing per batch; changed data is still refused, with the
  checks on or off;
- the products (graphs on, the default) equal the float64 Hessian from ``torch.func`` on each
  device (the ``device`` fixture): on CUDA they are replayed from CUDA graphs, on the CPU the same
  code runs eagerly;
- on CUDA, a replay equals the eager product (``graphs=False``), follows parameters changed in
  place, and the planner records what it captured and times its candidates on the whole batch;
- a capture that fails falls back to the eager product with a one-line warning saying why.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from landscape import HessianOperator
from landscape.engines import FwdRev, Graphed
from landscape.operator import DataChangedError
from tests.conftest import HostReads
from tests.landscape.test_engines import Shuffling, batches, cnn, mean_hessian, rel

CE = F.cross_entropy
ENGINES = ["fwd-rev", "rev-rev", "cached"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("on_nonfinite", ["raise", "nan"])
def test_a_pass_reads_the_host_once_whatever_the_number_of_batches(engine, on_nonfinite):
    model = cnn()
    reads = {}
    for sizes in ((12,), (12, 5, 9, 4, 7)):
        op = HessianOperator(model, CE, batches(sizes), engine=engine, on_nonfinite=on_nonfinite)
        V = torch.randn(op.dim, 2, dtype=torch.float64)
        op.matmat(V)  # the reduction, the first pass (its fingerprint is the reference)
        with HostReads(tensor_builds=False) as spy:
            op.matmat(V)
            op.matmat(V)
        reads[len(sizes)] = spy.calls
    assert reads[1] == reads[5] == ["tolist"] * 2, reads  # one per product: flags and fingerprint together


@pytest.mark.parametrize("engine", ENGINES)
def test_changed_data_is_refused_with_the_checks_off_too(engine):
    op = HessianOperator(cnn(), CE, Shuffling(batches()), engine=engine, on_nonfinite="nan")
    v = torch.randn(op.dim, dtype=torch.float64)
    op.matvec(v)
    with pytest.raises(DataChangedError, match=r"batch \d+ differs .*shuffle=False"):
        op.matvec(v)


def test_a_changed_batch_size_is_named_at_once():
    data = batches((12, 5, 9))

    class Growing:
        passes = 0

        def __iter__(self):
            Growing.passes += 1
            yield from data if Growing.passes == 1 else [data[0], data[1], (data[2][0][:8], data[2][1][:8])]

    op = HessianOperator(cnn(), CE, Growing(), engine="rev-rev")
    op.matvec(torch.randn(op.dim, dtype=torch.float64))
    with pytest.raises(DataChangedError, match=r"batch 2 differs .*\(8 samples.* vs 9 samples"):
        op.matvec(torch.randn(op.dim, dtype=torch.float64))


@pytest.mark.parametrize("engine", ENGINES)
def test_products_equal_the_float64_hessian_with_graphs_on(device, engine):
    """Two batch shapes (a short last batch), three products: on CUDA the first captures, the
    next replay; the planner says what was captured."""
    model = cnn().to(device)
    data = [(x.to(device), y.to(device)) for x, y in batches((12, 12, 5))]
    H = mean_hessian(cnn(), batches((12, 12, 5)))
    op = HessianOperator(model, CE, data, engine=engine)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        V = torch.randn(op.dim, 3, dtype=torch.float64, generator=g)
        assert rel(op.matmat(V.to(device)).cpu(), H @ V) < 1e-10
    choice = op.planner.get("graph")
    if device == "cuda":
        assert (choice.engine, choice.errors) == ("captured", {}), choice
        assert len(op._products.graphs) == (3 if engine == "cached" else 2)  # per batch / per shape
    else:
        assert (choice.engine, choice.how) == ("eager", "rule") and not op._products.graphs


def test_graphs_false_is_recorded_and_graphs_is_validated():
    op = HessianOperator(cnn(), CE, batches(), engine="fwd-rev", graphs=False)
    assert (op.planner.get("graph").engine, op.planner.get("graph").how) == ("eager", "requested")
    with pytest.raises(ValueError, match="graphs must be None, True or False"):
        HessianOperator(cnn(), CE, batches(), graphs="yes")


def test_a_failed_capture_falls_back_to_the_eager_product_with_one_line(monkeypatch):
    """The fallback, exercised on the CPU: a capture that raises leaves the eager product."""
    model, data = cnn(), batches()
    op = HessianOperator(model, CE, data, engine="fwd-rev")
    V = op.unflatten(torch.randn(op.dim, 2, dtype=torch.float64))
    want = op.to_block(FwdRev().products(op, 0, *data[0], V, op.frozen())[0])
    eng = Graphed(FwdRev())
    monkeypatch.setattr(Graphed, "active", lambda self, op: True)

    def broken(*a, **k):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(Graphed, "_capture", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = op.to_block(eng.products(op, 0, *data[0], V, op.frozen())[0])
        op.to_block(eng.products(op, 0, *data[0], V, op.frozen())[0])  # known to fail: no second try
    assert torch.equal(got, want)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "\n" not in msgs[0] and "runs eagerly" in msgs[0] and "stream is capturing" in msgs[0]
    assert list(eng.errors.values()) == ["RuntimeError: operation not permitted when stream is capturing"]
    assert not eng.graphs


class EagerGraphs:
    """A stand-in for :class:`landscape.engines.CudaGraphs` on the CPU: "capture" runs the product
    once and "replay" runs it again, reading the same static buffers a CUDA graph would read."""

    captures = 0

    def __init__(self, device):
        pass

    def side_stream(self):
        return contextlib.nullcontext()

    def capture(self, fn):
        EagerGraphs.captures += 1
        fn()
        return fn


@pytest.mark.parametrize("engine", ENGINES)
def test_the_capture_logic_run_eagerly_on_the_cpu(engine, monkeypatch):
    """Static inputs and outputs, keys (per shape, or per batch for "cached"), the copy of each
    batch and block into the static buffers, and a new capture after a buffer is replaced: with
    replays that rerun the product on the static buffers, the products stay exact."""
    monkeypatch.setattr(Graphed, "active", lambda self, op: True)
    monkeypatch.setattr(Graphed, "backend", EagerGraphs)
    EagerGraphs.captures = 0
    model, data = cnn(), batches((12, 12, 5))
    H = mean_hessian(model, data)
    op = HessianOperator(model, CE, data, engine=engine)
    g = torch.Generator().manual_seed(0)
    for k in (3, 3, 1):
        V = torch.randn(op.dim, k, dtype=torch.float64, generator=g)
        assert rel(op.matmat(V), H @ V) < 1e-10
    per_k = 3 if engine == "cached" else 2  # one per batch, or one per batch shape
    assert len(op._products.graphs) == EagerGraphs.captures == 2 * per_k and not op._products.errors
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.running_var = bn.running_var.clone()  # a buffer replaced (not changed in place): captured again
    V = torch.randn(op.dim, 1, dtype=torch.float64, generator=g)
    assert rel(op.matmat(V), H @ V) < 1e-10
    assert EagerGraphs.captures == 2 * per_k + per_k


# -- CUDA only ------------------------------------------------------------------------------------
def _resnet_like():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_replay_equals_the_eager_product(engine, k):
    model = _resnet_like().cuda()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 3, 16, 16, generator=g).cuda(), torch.randint(0, 10, (n,), generator=g).cuda())
            for n in (32, 32, 11)]
    graphed = HessianOperator(model, CE, data, engine=engine)
    eager = HessianOperator(model, CE, data, engine=engine, graphs=False)
    for _ in range(3):
        V = torch.randn(graphed.dim, k, device="cuda")
        a, b = graphed.matmat(V), eager.matmat(V)
        assert rel(a, b) < 1e-5, (engine, k)
    assert graphed._products.graphs and not graphed._products.errors
    assert not eager._products.graphs
    if engine != "cached":  # the replay reads the parameters where they are: an in-place change is seen
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        V = torch.randn(graphed.dim, k, device="cuda")
        assert rel(graphed.matmat(V), eager.matmat(V)) < 1e-5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_planner_times_replayed_candidates_on_the_whole_batch():
    model = _resnet_like().cuda()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(64, 3, 16, 16, generator=g).cuda(), torch.randint(0, 10, (64,), generator=g).cuda())]
    op = HessianOperator(model, CE, data)
    Z = torch.randn(op.dim, 8, device="cuda")
    q = op.quadratic_forms(Z)
    want = (Z.double() * HessianOperator(model, CE, data, quadratic="hvp", graphs=False).matmat(Z).double()).sum(0)
    assert torch.allclose(q.double(), want, rtol=1e-3)
    product, quadratic = op.planner.get("product"), op.planner.get("quadratic")
    assert product.how == "timing" and product.timings  # chosen before the forms, as the forms' "hvp"
    assert quadratic.how == "timing" and set(quadratic.timings) == {"taylor", "hvp"}, quadratic
    assert op.planner.get("graph").engine == "captured"
    if product.engine == "cached":  # timed on batch 0 of a list: the timed engine (and its captures) is kept
        assert any(key[0] == "batch" and key[1] == 0 for key in op._products.graphs)
