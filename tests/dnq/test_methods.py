import pytest
import torch
import torch.nn as nn

from dnq.methods import METHODS, make_method


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_sam_matches_hand_written_two_step_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    rho, lr = 0.1, 0.5
    w = [p.detach().clone() for p in model.parameters()]

    def loss_at(params):
        h = torch.tanh(x @ params[0].T + params[1])
        return nn.functional.cross_entropy(h @ params[2].T + params[3], y)

    # Foret et al. (2021), Algorithm 1: e = rho g / ||g||; g_sam = grad L(w + e); w <- w - lr g_sam
    p0 = [t.clone().requires_grad_(True) for t in w]
    g = torch.autograd.grad(loss_at(p0), p0)
    norm = torch.sqrt(sum((t ** 2).sum() for t in g))
    p1 = [(t + rho * gi / norm).requires_grad_(True) for t, gi in zip(w, g)]
    g_sam = torch.autograd.grad(loss_at(p1), p1)
    expected = [t - lr * gi for t, gi in zip(w, g_sam)]

    method = make_method("sam", sam_rho=rho)
    method.setup(model, x, torch.device("cpu"), 0, 0)
    method.on_epoch_start(0, 0.0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad()
    loss, _ = method.step(model, x, y, nn.CrossEntropyLoss(), _null)
    opt.step()
    torch.testing.assert_close(loss, loss_at(w))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


def test_sam_second_pass_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    model(x)  # materialize the lazy layer
    ref = nn.Sequential(*[m for m in model])  # same modules
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    model.train()
    with torch.no_grad():
        model(x)  # one training forward: the statistics SAM must end with
    expected = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    model.load_state_dict(state)
    method = make_method("sam")
    method.setup(model, x, torch.device("cpu"), 0, 0)
    method.step(ref, x, y, nn.CrossEntropyLoss(), _null)
    got = {k: v for k, v in model.state_dict().items() if k in expected}
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        make_method("adam")
    assert all(m in str(e.value) for m in METHODS)
