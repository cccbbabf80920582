"""Taylor-mode quadratic forms z^T H z against an explicit float64 Hessian (torch.func.hessian)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from landscape import HessianOperator, hessian_trace
from landscape.taylor import TaylorQuadratic, UnsupportedError


class Block(nn.Module):
    """A residual block with functional ops: F.relu, +, view(size(0), -1), torch.cat, a gate x * sigmoid(x)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.short = nn.Conv2d(2, 3, 1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * 3 * 3 * 3, 4)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)) + self.short(x))
        h = self.pool(h)
        g = h * torch.sigmoid(h)
        h = torch.cat([h, g], dim=1)
        return self.fc(h.view(h.size(0), -1))


class Functional(nn.Module):
    """Parameters used through F.linear (with a bias), torch.matmul and a division (get_attr nodes)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 2 * 6 * 6) * 0.1)
        self.b = nn.Parameter(torch.randn(5) * 0.1)
        self.v = nn.Parameter(torch.randn(5, 4) * 0.3)

    def forward(self, x):
        h = torch.tanh(F.linear(x.flatten(1), self.w, self.b))
        return torch.matmul(h, self.v) / 2


def models():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(inplace=True),
                        nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.GELU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    bn_alone = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.BatchNorm2d(3), nn.SiLU(), nn.Flatten(),
                             nn.Linear(3 * 4 * 4, 4))
    return {"cnn": cnn, "block": Block(), "bn-not-after-conv": bn_alone, "functional": Functional()}


def randomize_bn(model):
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


def explicit_hessian(model, loss_fn, x, y, names):
    params = {n: p.detach() for n, p in model.named_parameters()}
    fixed = {**params, **dict(model.named_buffers())}
    shapes = [params[n].shape for n in names]

    def f(flat):
        d, i = {}, 0
        for n, s in zip(names, shapes):
            d[n] = flat[i:i + s.numel()].view(s)
            i += s.numel()
        return loss_fn(functional_call(model, {**fixed, **d}, (x,)), y)

    return torch.func.hessian(f)(torch.cat([params[n].reshape(-1) for n in names]))


def split(model, Z, names):
    params = dict(model.named_parameters())
    out, i = {}, 0
    for n in names:
        c = params[n].numel()
        out[n] = Z[i:i + c].T.reshape(Z.shape[1], *params[n].shape)
        i += c
    return out


@pytest.mark.parametrize("name", ["cnn", "block", "bn-not-after-conv", "functional"])
@pytest.mark.parametrize("loss", ["ce", "ce-smoothed", "ce-probabilities", "mse"])
def test_forms_match_the_explicit_hessian(name, loss):
    model = randomize_bn(models()[name].double()).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, 6, 6, dtype=torch.float64, generator=g)
    loss_fn = {"ce": F.cross_entropy, "ce-smoothed": nn.CrossEntropyLoss(label_smoothing=0.2),
               "ce-probabilities": F.cross_entropy, "mse": nn.MSELoss()}[loss]
    if loss == "ce-probabilities":
        y = torch.softmax(torch.randn(6, 4, dtype=torch.float64, generator=g), 1)
    elif loss == "mse":
        y = torch.randn(6, 4, dtype=torch.float64, generator=g)
    else:
        y = torch.randint(0, 4, (6,), generator=g)
    names = [n for n, _ in model.named_parameters()]
    H = explicit_hessian(model, loss_fn, x, y, names)
    Z = torch.randn(H.shape[0], 5, dtype=torch.float64, generator=g)
    q = TaylorQuadratic(model, loss_fn, names)(x, y, split(model, Z, names))
    ref = (Z * (H @ Z)).sum(0)
    assert torch.allclose(q, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))


def test_a_parameter_subset_gives_the_diagonal_block():
    model = randomize_bn(models()["block"].double()).eval()
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (5,))
    names = ["bn1.weight", "conv2.weight", "fc.bias"]  # BatchNorm scale folded into a frozen conv, and more
    H = explicit_hessian(model, F.cross_entropy, x, y, names)
    Z = torch.randn(H.shape[0], 3, dtype=torch.float64)
    q = TaylorQuadratic(model, F.cross_entropy, names)(x, y, split(model, Z, names))
    assert torch.allclose(q, (Z * (H @ Z)).sum(0), rtol=1e-10)


def test_operator_forms_over_batches_match_and_auto_picks_a_checked_path():
    model = randomize_bn(models()["cnn"].double())
    model.train()
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(n, 2, 6, 6, dtype=torch.float64, generator=g), torch.randint(0, 4, (n,), generator=g))
            for n in (40, 9)]  # a short last batch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.cat([d[0] for d in data])
    y = torch.cat([d[1] for d in data])
    model.eval()
    H = explicit_hessian(model, F.cross_entropy, x, y, [n for n, _ in model.named_parameters()])
    model.train()
    Z = torch.randn(H.shape[0], 11, dtype=torch.float64, generator=g)
    for quadratic in ("taylor", "hvp", "auto"):
        op = HessianOperator(model, F.cross_entropy, data, quadratic=quadratic)
        q = op.quadratic_forms(Z)
        assert torch.allclose(q, (Z * (H @ Z)).sum(0), rtol=1e-9), quadratic
        assert op.num_matvecs >= 11 and op.quadratic in ("taylor", "hvp")
        assert "taylor" not in op.method_errors, op.method_errors
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):  # softmax has no Taylor-mode rule here
        a = torch.softmax(self.q(x) @ x.transpose(1, 2), dim=-1)
        return self.out((a @ x).mean(1))


def test_unsupported_models_and_losses_fall_back_to_exact_products():
    torch.manual_seed(0)
    model = Attention().double()
    data = [(torch.randn(8, 5, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))]
    with pytest.raises(UnsupportedError, match="softmax"):
        TaylorQuadratic(model, F.cross_entropy, [n for n, _ in model.named_parameters()])(
            data[0][0], data[0][1], {n: torch.zeros(1, *p.shape, dtype=torch.float64)
                                     for n, p in model.named_parameters()})
    with pytest.raises(UnsupportedError, match="no Taylor-mode rule"):
        TaylorQuadratic(nn.Linear(3, 2), lambda out, y: out.pow(2).mean(), ["weight"])
    op = HessianOperator(model, F.cross_entropy, data)
    ref = HessianOperator(model, F.cross_entropy, data, quadratic="hvp")
    a = hessian_trace(op, 8, method="hutchinson", seed=4)
    b = hessian_trace(ref, 8, method="hutchinson", seed=4)
    assert op.quadratic == "hvp" and "softmax" in op.method_errors["taylor"]
    assert a.value == pytest.approx(b.value, rel=1e-10)
    with pytest.raises(ValueError, match="unknown quadratic"):
        HessianOperator(model, F.cross_entropy, data, quadratic="jet")


def test_hutchinson_with_taylor_forms_equals_hutchinson_with_products():
    model = randomize_bn(models()["block"].double()).eval()
    data = [(torch.randn(16, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (16,)))]
    a = hessian_trace(HessianOperator(model, F.cross_entropy, data, quadratic="taylor"), 20, method="hutchinson")
    b = hessian_trace(HessianOperator(model, F.cross_entropy, data, quadratic="hvp"), 20, method="hutchinson")
    assert a.value == pytest.approx(b.value, rel=1e-10) and a.std_error == pytest.approx(b.std_error, rel=1e-8)


# -- memory: each value dropped after its last use ------------------------------------------------
def _resnet20():
    from dnq.models import build_model

    torch.manual_seed(0)
    return randomize_bn(build_model("resnet20", 10, 3, 32)).eval()


@pytest.mark.parametrize("name", ["cnn", "block", "bn-not-after-conv", "functional", "resnet20"])
def test_freeing_values_after_their_last_use_changes_no_result(name):
    model = _resnet20() if name == "resnet20" else randomize_bn(models()[name]).eval()
    shape = (4, 3, 32, 32) if name == "resnet20" else (6, 2, 6, 6)
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(shape, generator=g), torch.randint(0, 4, (shape[0],), generator=g)
    V = {n: torch.randn(3, *p.shape, generator=g) for n, p in model.named_parameters()}
    names = list(V)
    freed, kept = TaylorQuadratic(model, F.cross_entropy, names), TaylorQuadratic(model, F.cross_entropy, names,
                                                                                  free=False)
    q_freed, q_kept = freed(x, y, V), kept(x, y, V)
    assert torch.equal(q_freed, q_kept), (q_freed, q_kept)  # bit for bit
    assert freed.peak_bytes == kept.peak_bytes > 0  # the largest activation: what HessianOperator sizes blocks by
    assert 0 < freed.peak_live_bytes < kept.peak_live_bytes


def test_live_bytes_match_a_count_by_hand():
    """x -> Linear (its weight differentiated) -> tanh -> tanh -> tanh, with k probes; in units of
    one (B, d) activation: x is 1, the Linear's output 1 + k (no second-order term), each tanh's
    1 + 2k. Freed, at most two values are held (the tanh's input and output): 2 + 4k at the second
    tanh; kept: 1 + (1 + k) + 3 (1 + 2k) = 5 + 7k at the end."""
    B, d, k = 8, 64, 2
    model = nn.Sequential(nn.Linear(d, d, bias=False), nn.Tanh(), nn.Tanh(), nn.Tanh()).eval()
    x, y = torch.randn(B, d), torch.randint(0, d, (B,))
    V = {"0.weight": torch.randn(k, d, d)}
    unit = B * d * 4
    freed, kept = (TaylorQuadratic(model, F.cross_entropy, ["0.weight"], free=f) for f in (True, False))
    assert torch.equal(freed(x, y, V), kept(x, y, V))
    assert freed.peak_live_bytes == (2 + 4 * k) * unit
    assert kept.peak_live_bytes == (5 + 7 * k) * unit
    assert freed.peak_bytes == unit


def test_freeing_cuts_the_peak_live_memory_of_resnet20():
    """Measured 0.103 of the kept peak (batch 4 or 8, k = 2 to 4): a deep network holds a few
    values at a time, not its ~70 activations with their tangents."""
    model = _resnet20()
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    V = {n: torch.randn(2, *p.shape, generator=g) for n, p in model.named_parameters()}
    freed, kept = (TaylorQuadratic(model, F.cross_entropy, list(V), free=f) for f in (True, False))
    assert torch.equal(freed(x, y, V), kept(x, y, V))
    assert freed.peak_live_bytes < kept.peak_live_bytes / 5, (freed.peak_live_bytes, kept.peak_live_bytes)
