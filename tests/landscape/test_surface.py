"""Directions and loss surfaces."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from landscape import (
    HessianOperator,
    eigenvector_directions,
    interpolation_direction,
    quantization_direction,
    random_directions,
    surface_1d,
    surface_2d,
    top_eigenvalues,
)

CE = nn.functional.cross_entropy


def bn_cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(),
                      nn.Flatten(), nn.Linear(5 * 4 * 4, 3))
    return m


def data():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 1, 6, 6, generator=g) for n in (16, 16, 7)]
    return [(x, torch.randint(0, 3, (len(x),), generator=g)) for x in xs]


def full_loss(model, batches):
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(was)
    return CE(out, y).item(), (out.argmax(1) == y).double().mean().item()


def test_filter_normalization_gives_each_filter_the_models_norm():
    model = bn_cnn()
    with torch.no_grad():
        model[0].weight[2].zero_()  # an all-zero filter must not divide by zero
    d = random_directions(model, n=1, normalization="filter", seed=0)[0]
    for name, w in model.named_parameters():
        if w.dim() > 1:
            dn = d[name].reshape(w.shape[0], -1).norm(dim=1)
            wn = w.detach().reshape(w.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(dn, wn, rtol=1e-5, atol=1e-7)
        else:
            assert torch.count_nonzero(d[name]) == 0  # biases and BatchNorm: zero by default
    assert torch.isfinite(d["0.weight"]).all() and d["0.weight"][2].abs().sum() == 0
    with_1d = random_directions(model, n=1, normalization="filter", seed=0, include_1d=True)[0]
    assert with_1d["1.weight"].norm().item() == pytest.approx(model[1].weight.norm().item(), rel=1e-5)


def test_layer_and_model_normalization_and_seeds():
    model = bn_cnn()
    a, b = random_directions(model, n=2, normalization="layer", seed=5)
    assert a.meta["seed"] == 5 and b.meta["seed"] == 6 and not torch.equal(a["0.weight"], b["0.weight"])
    assert a["3.weight"].norm().item() == pytest.approx(model[3].weight.norm().item(), rel=1e-5)
    again = random_directions(model, n=1, normalization="layer", seed=5)[0]
    assert torch.equal(again["0.weight"], a["0.weight"])
    m = random_directions(model, n=1, normalization="model", seed=0)[0]
    wn = math.sqrt(sum(p.norm().item() ** 2 for p in model.parameters() if p.dim() > 1))
    assert m.norm() == pytest.approx(wn, rel=1e-5)
    with pytest.raises(ValueError, match="filter, layer, model, none"):
        random_directions(model, normalization="unit")


def test_filter_normalization_on_a_fresh_batchnorm_model_is_finite():
    # loss-landscapes divides by zero here; BatchNorm at initialization has bias 0 and weight 1
    model = bn_cnn()
    d = random_directions(model, n=2, normalization="filter", include_1d=True)
    assert all(torch.isfinite(t).all() for dd in d for t in dd.values())


def test_surfaces_at_the_origin_equal_the_models_loss_and_restore_the_model():
    model = bn_cnn()
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 1, 6, 6))  # running statistics away from the defaults
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = data()
    loss0, acc0 = full_loss(model, batches)
    dirs = random_directions(model, 2, seed=0)
    for chunk in (1, 4, "auto"):
        s2 = surface_2d(model, CE, batches, dirs, span=(-1, 1), steps=5, chunk_size=chunk)
        assert s2.loss.shape == (5, 5) and s2.loss[2, 2] == pytest.approx(loss0, rel=1e-5)
        assert s2.accuracy[2, 2] == pytest.approx(acc0) and s2.center_loss == pytest.approx(loss0, rel=1e-5)
    s1 = surface_1d(model, CE, batches, dirs[0], span=(-2, 2), steps=9)
    assert s1.loss[4] == pytest.approx(loss0, rel=1e-5) and s1.betas is None
    assert model.training and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert s2.directions[0]["seed"] == 0 and s2.directions[0]["norm"] > 0
    assert set(s2.to_dict()) >= {"alphas", "betas", "loss", "accuracy", "directions"}


def test_surface_point_matches_a_perturbed_copy():
    import copy

    model = bn_cnn()
    batches = data()
    d = random_directions(model, 1, seed=1)[0]
    s = surface_1d(model, CE, batches, d, span=(0.0, 0.5), steps=2)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.add_(0.5 * d[n])
    assert s.loss[1] == pytest.approx(full_loss(moved, batches)[0], rel=1e-5)


def test_non_finite_points_become_nan_not_a_crash():
    model = bn_cnn()
    d = random_directions(model, 1, seed=0)[0]
    s = surface_1d(model, CE, data(), d, span=(0.0, 1e30), steps=3)
    assert np.isnan(s.loss[2]) and np.isfinite(s.loss[0])


def test_interpolation_quantization_and_eigen_directions():
    a, b = bn_cnn(), bn_cnn()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.1)
    batches = data()
    s = surface_1d(a, CE, batches, interpolation_direction(a, b), span=(0, 1), steps=2)
    assert s.loss[1] == pytest.approx(full_loss(b, batches)[0], rel=1e-5)
    q = bn_cnn()
    with torch.no_grad():
        for p in q.parameters():
            p.copy_(torch.round(p * 4) / 4)
    qd = quantization_direction(a, q)
    assert qd.meta["kind"] == "quantization"
    assert (surface_1d(a, CE, batches, qd, span=(0, 1), steps=2).loss[1]
            == pytest.approx(full_loss(q, batches)[0], rel=1e-5))
    eig = top_eigenvalues(HessianOperator(a, CE, batches), k=2, tol=1e-3)
    ed = eigenvector_directions(eig)
    assert len(ed) == 2 and ed[0].norm() == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="same architecture"):
        interpolation_direction(a, nn.Linear(2, 2))


def test_bad_surface_arguments():
    model = bn_cnn()
    d = random_directions(model, 2)
    with pytest.raises(ValueError, match="two directions"):
        surface_2d(model, CE, data(), d[:1])
    with pytest.raises(ValueError, match="positive integer"):
        surface_1d(model, CE, data(), d[0], steps=0)
    with pytest.raises(ValueError, match="not trainable parameters"):
        surface_1d(model, CE, data(), {"nope": torch.zeros(1)})


def test_plot_helpers_build_figures():
    from landscape import hessian_trace, spectral_density
    from landscape.plot import plot_density, plot_eigenvalues, plot_surface_1d, plot_surface_2d, plot_trace

    model = bn_cnn()
    batches = data()
    op = HessianOperator(model, CE, batches)
    tr = hessian_trace(op, 12, method="hutchinson")
    assert len(plot_trace(tr).data[0].x) == 12
    eig = top_eigenvalues(op, k=2, tol=1e-3)
    assert list(plot_eigenvalues(eig).data[0].y) == eig.eigenvalues
    esd = spectral_density(op, num_runs=2, lanczos_steps=8)
    assert len(plot_density(esd).data[0].x) == len(esd.grid)
    d = random_directions(model, 2)
    s1 = surface_1d(model, CE, batches, d[0], steps=5)
    assert len(plot_surface_1d(s1, mark=1.0).data) == 2
    s2 = surface_2d(model, CE, batches, d, steps=4)
    fig = plot_surface_2d(s2)
    assert fig.data[0].type == "surface" and np.asarray(fig.data[0].z).shape == (4, 4)
    assert plot_surface_2d(s2, kind="contour").data[0].type == "contour"


# -- engines (issue 13): folded BatchNorm, channels_last, torch.compile, vmap -------------------------
def bn_net():
    """Conv + BatchNorm twice (one conv without bias), linear + BatchNorm1d, running statistics
    and BatchNorm affine parameters away from their defaults."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 5, 3, bias=False), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(),
                      nn.Linear(5 * 4 * 4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    m.train()
    with torch.no_grad():
        m(torch.randn(64, 1, 6, 6) * 2 + 0.5)
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    return m.eval()


def test_folded_batchnorm_surfaces_equal_the_unfolded_ones_when_directions_move_batchnorm():
    model = bn_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = data()
    dirs = random_directions(model, 2, seed=3, include_1d=True)
    assert dirs[0]["1.weight"].abs().sum() > 0 and dirs[1]["8.bias"].abs().sum() > 0  # BatchNorm moves too
    folded = surface_2d(model, CE, batches, dirs, span=(-1.5, 1.5), steps=4, compile=False)
    plain = surface_2d(model, CE, batches, dirs, span=(-1.5, 1.5), steps=4, chunk_size=1)
    assert folded.engine["surface"]["engine"] == "folded" and plain.engine["surface"]["engine"] == "copy"
    assert folded.engine["surface"]["reason"].startswith("3 BatchNorm layer(s) folded, channels_last")
    np.testing.assert_allclose(folded.loss, plain.loss, rtol=1e-5)
    np.testing.assert_allclose(folded.accuracy, plain.accuracy)
    assert folded.center_loss == pytest.approx(full_loss(model, batches)[0], rel=1e-5)
    off = surface_1d(model, CE, batches, dirs[0], span=(0.5, 1.0), steps=2, compile=False)  # origin not on the grid
    assert off.center_loss == pytest.approx(full_loss(model, batches)[0], rel=1e-5)
    assert np.ptp(plain.loss) > 0.1  # the points differ: moving BatchNorm without refolding would show
    assert not model.training and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_folding_is_refused_for_hooks_and_the_copy_engine_keeps_them():
    model = bn_net()
    calls = []
    h = model[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        s = surface_1d(model, CE, data(), random_directions(model, 1, seed=0)[0], steps=3)
    finally:
        h.remove()
    assert s.engine["surface"]["engine"] == "copy" and "forward hooks" in s.engine["surface"]["reason"]
    assert len(calls) >= 3 * len(data())


def test_vmapped_chunks_equal_the_copy_and_the_engine_is_recorded():
    model = bn_net()
    dirs = random_directions(model, 2, seed=1, include_1d=True)
    v = surface_2d(model, CE, data(), dirs, steps=3, chunk_size=4)
    c = surface_2d(model, CE, data(), dirs, steps=3, chunk_size=1)
    assert v.engine["surface"]["engine"] == "vmap" and v.engine["surface"]["block"] == 4
    assert v.engine["surface"]["how"] == "requested" and v.engine["compile"]["engine"] == "none"
    np.testing.assert_allclose(v.loss, c.loss, rtol=1e-5)
    assert set(c.engine) == {"surface", "batching", "compile"} and "engine" in c.to_dict()
    from landscape.surface import SurfaceResult

    assert SurfaceResult(np.zeros(1), None, np.zeros(1), np.zeros(1), [], 0.0, 1).engine == {}  # positional still works


def test_compiled_surface_equals_eager_and_compiles_once():
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = bn_net()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(12, 1, 6, 6, generator=g), torch.randint(0, 3, (12,), generator=g)) for _ in range(2)]
    dirs = random_directions(model, 2, seed=4, include_1d=True)
    before = counters["stats"]["unique_graphs"]
    comp = surface_2d(model, CE, batches, dirs, steps=5, compile=True, max_batch=0)
    assert counters["stats"]["unique_graphs"] - before == 1  # one graph for 25 points and 2 batches each
    assert comp.engine["surface"]["engine"] == "compiled" and comp.engine["compile"]["how"] == "requested"
    assert comp.engine["compile"]["timings"]["graphs"] == 1 and comp.engine["compile"]["timings"]["compile_s"] > 0
    eager = surface_2d(model, CE, batches, dirs, steps=5, chunk_size=1, max_batch=0)
    np.testing.assert_allclose(comp.loss, eager.loss, rtol=1e-5)
    np.testing.assert_allclose(comp.accuracy, eager.accuracy)


def test_auto_compiles_only_past_the_threshold_and_once_per_surface(monkeypatch):
    from torch._dynamo.testing import CompileCounter

    import landscape.surface as surface

    model = bn_net()
    dirs = random_directions(model, 2, seed=0)
    batches = [(x[:7], y[:7]) for x, y in data()]  # equal batches: one input shape
    monkeypatch.setattr(surface, "_COMPILE_PAYS_S", float("inf"))
    never = surface_2d(model, CE, batches, dirs, steps=5, max_batch=0)
    assert never.engine["compile"]["engine"] == "none" and never.engine["compile"]["how"] == "rule"
    assert never.engine["surface"]["engine"] == "folded"
    counter = CompileCounter()  # dynamo's tracing without inductor: fast
    monkeypatch.setattr(surface, "_COMPILE_BACKEND", counter)
    monkeypatch.setattr(surface, "_COMPILE_PAYS_S", 0.0)
    s = surface_2d(model, CE, batches, dirs, steps=5, max_batch=0)
    assert counter.frame_count == 1  # 25 points, 3 batches each, the two timing points: one compile
    assert s.engine["compile"]["how"] == "rule" and "compile_s" in s.engine["compile"]["timings"]
    assert s.engine["surface"]["how"] == "timing" and set(s.engine["surface"]["timings"]) == {"folded", "compiled"}
    np.testing.assert_allclose(s.loss, never.loss, rtol=1e-5)


def test_bad_engine_arguments():
    model = bn_net()
    d = random_directions(model, 1)[0]
    with pytest.raises(ValueError, match="compile must be True, False or 'auto'"):
        surface_1d(model, CE, data(), d, steps=2, compile="yes")
    with pytest.raises(ValueError, match="chunk_size must be 'auto' or 1"):
        surface_1d(model, CE, data(), d, steps=2, compile=True, chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size must be 'auto' or a positive integer"):
        surface_1d(model, CE, data(), d, steps=2, chunk_size=0)
    with pytest.raises(ValueError, match="max_batch must be None or an integer >= 0"):
        surface_1d(model, CE, data(), d, steps=2, max_batch=-1)
    with pytest.raises(ValueError, match="data is empty"):
        surface_1d(model, CE, [], d, steps=2)


def test_the_planner_times_vmapped_chunks_against_the_folded_graph(monkeypatch):
    import landscape.surface as surface

    monkeypatch.setattr(surface, "_VMAP_ON_CPU", True)  # as on accelerators
    model = bn_net()
    dirs = random_directions(model, 2, seed=2)
    s = surface_2d(model, CE, data(), dirs, steps=5, compile=False, max_batch=0)
    c = s.engine["surface"]
    assert c["how"] == "timing" and set(c["timings"]) == {"folded", "vmap@8"}
    assert c["engine"] in ("folded", "vmap") and (c["block"] == 8) == (c["engine"] == "vmap")
    ref = surface_2d(model, CE, data(), dirs, steps=5, chunk_size=1, max_batch=0)
    np.testing.assert_allclose(s.loss, ref.loss, rtol=1e-5)


class DictInputNet(nn.Module):
    """A model whose forward takes a dict (pytree) batch, with a BatchNorm the folded engine folds."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, batch):
        return self.b(torch.tanh(self.bn(self.a(batch["x"]))) * batch["scale"])


@pytest.mark.parametrize("engine", ["auto", "copy", "vmap", "compiled"])
def test_surfaces_take_dict_inputs_like_the_operator(engine):
    torch.manual_seed(0)
    model = DictInputNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    batches = [({"x": torch.randn(n, 4, generator=g), "scale": torch.rand(n, 1, generator=g)},
                torch.randint(0, 3, (n,), generator=g)) for n in (16, 16, 5)]
    dirs = random_directions(model, 2, seed=0)
    kw = {"auto": {}, "copy": {"chunk_size": 1}, "vmap": {"chunk_size": 3}, "compiled": {"compile": True}}[engine]
    s1 = surface_1d(model, CE, batches, dirs[0], steps=5, progress=False, **kw)
    s2 = surface_2d(model, CE, batches, dirs, steps=3, progress=False, **kw)
    base = {n: p.detach() for n, p in model.named_parameters()}
    x = {k: torch.cat([b[0][k] for b in batches]) for k in ("x", "scale")}
    y = torch.cat([b[1] for b in batches])

    def loss_at(a, b=0.0):
        p = {n: base[n] + a * dirs[0].get(n, 0) + b * dirs[1].get(n, 0) for n in base}
        with torch.no_grad():
            return float(CE(torch.func.functional_call(model, {**p, **dict(model.named_buffers())}, (x,)), y))

    want1 = [loss_at(a) for a in s1.alphas]
    np.testing.assert_allclose(s1.loss, want1, rtol=1e-5)
    want2 = [[loss_at(a, b) for b in s2.betas] for a in s2.alphas]
    np.testing.assert_allclose(s2.loss, want2, rtol=1e-5)
    expected = {"auto": "folded", "copy": "copy", "vmap": "vmap", "compiled": "compiled"}[engine]
    assert s1.engine["surface"]["engine"] == expected
