"""Directions and loss surfaces."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from landscape import (eigenvector_directions, interpolation_direction, quantization_direction, random_directions,
                       surface_1d, surface_2d, top_eigenvalues, HessianOperator)

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
    assert surface_1d(a, CE, batches, qd, span=(0, 1), steps=2).loss[1] == pytest.approx(full_loss(q, batches)[0], rel=1e-5)
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
