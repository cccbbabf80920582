import math
import warnings

import pytest
import torch
import torch.nn as nn

from dnq.models import build_model
from dnq.noise import weight_error_stats
from dnq.quant import (
    ActObserver,
    act_qparams,
    fake_quantize,
    fold_batchnorm,
    parse_bits,
    quant_layers,
    quantize,
    quantize_weight,
    weight_qparams,
)
from tests.conftest import UntraceableConvBN


def test_symmetric_weight_quantizer_hand_example():
    # channel 0: max|w| = 0.7, 4 bits -> qmax 7, scale 0.1; channel 1: max 1.4 -> scale 0.2
    w = torch.tensor([[0.7, -0.36, 0.12, 0.0], [1.4, 0.26, -0.33, 0.05]])
    expected = torch.tensor([[0.7, -0.4, 0.1, 0.0], [1.4, 0.2, -0.4, 0.0]])
    torch.testing.assert_close(quantize_weight(w, 4), expected, atol=1e-6, rtol=0)
    scale, zp, qmin, qmax = weight_qparams(w, 4)
    torch.testing.assert_close(scale, torch.tensor([0.1, 0.2]))
    assert (qmin, qmax) == (-7, 7) and torch.all(zp == 0)


def test_asymmetric_weight_quantizer_hand_example():
    # range [-0.5, 1.0] (contains 0); 2 bits -> 4 levels, scale 0.5, zero point 1
    w = torch.tensor([[-0.5, 0.2, 0.8, 1.0]])
    expected = torch.tensor([[-0.5, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(quantize_weight(w, 2, mode="asymmetric"), expected)


def test_activation_quantizer_hand_example():
    scale, zp, qmin, qmax = act_qparams(-1.0, 2.75, 4)
    assert (scale, zp, qmin, qmax) == (0.25, 4.0, 0, 15)
    x = torch.tensor([-1.2, -0.1, 0.3, 2.0, 3.0])
    q = fake_quantize(x, torch.tensor(scale), torch.tensor(zp), qmin, qmax)
    torch.testing.assert_close(q, torch.tensor([-1.0, 0.0, 0.25, 2.0, 2.75]))


def test_activation_range_always_contains_zero():
    scale, zp, _, _ = act_qparams(0.5, 2.0, 8)  # post-ReLU-like range not touching 0
    assert zp == 0 and math.isclose(scale, 2.0 / 255)


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_weight_error_variance_matches_uniform_theory(bits):
    # uniform weights: the rounding error is uniform on [-D/2, D/2], variance D^2 / 12
    torch.manual_seed(0)
    layer = nn.Linear(200_000, 4, bias=False)
    with torch.no_grad():
        layer.weight.uniform_(-1, 1)
    model = nn.Sequential(layer)
    mean, var = weight_error_stats(model, bits)["0"]
    delta = layer.weight.abs().amax(dim=1) / (2 ** (bits - 1) - 1)
    torch.testing.assert_close(var, delta ** 2 / 12, rtol=0.02, atol=0)
    assert torch.all(mean.abs() < 4 * delta / math.sqrt(12 * 50_000))


def test_fold_batchnorm_preserves_outputs(tiny_cnn):
    model = tiny_cnn.double()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "resnet18"])
def test_fold_batchnorm_on_cifar_models(name):
    torch.manual_seed(0)
    model = build_model(name, 10, 3, 32).double()
    model.train()
    with torch.no_grad():  # a few training batches give non-trivial running statistics
        for _ in range(2):
            model(torch.randn(8, 3, 32, 32, dtype=torch.float64))
    model.eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-8, atol=1e-8)


def test_quantize_never_touches_the_original(tiny_cnn):
    tiny_cnn.train()
    before = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    hooks = sum(len(m._forward_pre_hooks) for m in tiny_cnn.modules())
    q = quantize(tiny_cnn, 4, 4, torch.randn(64, 1, 8, 8))
    assert q is not tiny_cnn and tiny_cnn.training and not q.training
    after = tiny_cnn.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sum(len(m._forward_pre_hooks) for m in tiny_cnn.modules()) == hooks


def test_quantized_model_uses_quantized_weights_and_activations(tiny_cnn):
    calib = torch.randn(128, 1, 8, 8)
    q = quantize(tiny_cnn, 2, 3, calib, first_last_bits=8)
    layers = dict(quant_layers(q))
    info = {d["layer"]: d for d in q.ptq_layers}
    first, last = q.ptq_layers[0]["layer"], q.ptq_layers[-1]["layer"]
    assert info[first]["wbits"] == 8 and info[last]["abits"] == 8
    for name, layer in layers.items():
        w = layer.weight.reshape(layer.weight.shape[0], -1)
        levels = max(len(torch.unique(row)) for row in w)
        if name in (first, last):
            assert levels > 3  # 8-bit grid
        else:
            assert levels <= 3 and info[name]["abits"] == 3  # ternary grid at 2 bits
    # the input quantizer of a middle layer really rounds: its input takes at most 8 values
    mid = q.ptq_layers[1]["layer"]
    seen = []
    h = layers[mid].register_forward_hook(lambda m, a, o: seen.append(m.input_quantizer(a[0])))
    q(calib[:8])
    h.remove()
    assert len(torch.unique(seen[0])) <= 2 ** 3


def test_w8a8_is_close_to_fp(tiny_cnn):
    x = torch.randn(256, 1, 8, 8)
    q = quantize(tiny_cnn, 8, 8, x)
    ref = tiny_cnn(x)
    err = (q(x) - ref).norm() / ref.norm()
    assert err < 0.02


def test_mse_range_never_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((16, 512))  # heavy tails: clipping pays
    e_mm = (quantize_weight(w, 3, method="minmax") - w).pow(2).sum(1)
    e_mse = (quantize_weight(w, 3, method="mse") - w).pow(2).sum(1)
    assert torch.all(e_mse <= e_mm + 1e-6) and e_mse.sum() < 0.9 * e_mm.sum()


def test_percentile_observer_matches_numpy_percentile():
    import numpy as np

    torch.manual_seed(0)
    obs = ActObserver(max_samples=1 << 22)
    x = torch.randn(4, 50_000)
    for row in x:
        obs.observe(row)
    lo, hi = obs.range(8, "percentile", 99.0)
    vals = torch.cat(obs.samples).numpy()
    assert math.isclose(hi, float(np.percentile(vals, 99.0)), rel_tol=1e-4)
    assert math.isclose(lo, float(np.percentile(vals, 1.0)), rel_tol=1e-4)
    assert obs.range(8, "minmax") == (float(x.min()), float(x.max()))


@pytest.mark.parametrize("bad", ["W1A4", "W9A8", "W4", "4,4", "W4A4,W8"])
def test_parse_bits_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match="2..8"):
        parse_bits(bad)


def test_parse_bits():
    assert parse_bits("W8A8, w2a4") == [(8, 8), (2, 4)]


def test_quantize_rejects_bad_arguments(tiny_cnn):
    x = torch.randn(8, 1, 8, 8)
    with pytest.raises(ValueError, match="2..8"):
        quantize(tiny_cnn, 1, 4, x)
    with pytest.raises(ValueError, match="minmax, percentile, mse"):
        quantize(tiny_cnn, 4, 4, x, range_method="kl")
    with pytest.raises(ValueError, match="empty"):
        quantize(tiny_cnn, 4, 4, torch.empty(0, 1, 8, 8))


def test_untraceable_model_is_quantized_without_folding():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        q = quantize(UntraceableConvBN().eval(), 8, 8, torch.randn(8, 1, 8, 8), first_last_bits=None)
    assert any("not folded" in str(x.message) for x in w)
    assert isinstance(q.bn, nn.BatchNorm2d)


class _Reordered(nn.Module):
    """Registered head first, stem last: registration order is not execution order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 10)
        self.mid = nn.Conv2d(4, 8, 3, padding=1)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.mid(x))
        return self.head(self.pool(x).flatten(1))


def test_first_and_last_layers_are_decided_once_in_execution_order():
    """PTQ and the DNQ noise statistics agree on which layers are first and last: the layers a
    forward pass calls first and last, not the first and last registered."""
    from dnq.noise import QuantNoise
    from dnq.quant import execution_order, layer_bits, quantize_weight, weight_error

    torch.manual_seed(0)
    model = _Reordered()
    x = torch.randn(16, 1, 8, 8)
    assert [n for n, _ in quant_layers(model)] == ["head", "mid", "stem"]
    assert execution_order(model, x) == ["stem", "mid", "head"]
    assert layer_bits(["stem", "mid", "head"], 3, 4, 8) == {"stem": (8, 8), "mid": (3, 4), "head": (8, 8)}
    assert layer_bits(["stem", "mid", "head"], 3, 4, None) == {"stem": (3, 4), "mid": (3, 4), "head": (3, 4)}
    q = quantize(model, 3, 4, x, first_last_bits=8)
    assert {r["layer"]: (r["wbits"], r["abits"]) for r in q.ptq_layers} == {"stem": (8, 8), "mid": (3, 4),
                                                                            "head": (8, 8)}
    noise = QuantNoise(model, 3, 4, first_last_bits=8)
    noise.update(x)
    for name, bits in (("stem", 8), ("mid", 3), ("head", 8)):
        w = getattr(model, name).weight.detach()
        err = (quantize_weight(w, bits) - w).reshape(w.shape[0], -1)  # Q(W) - W written out
        torch.testing.assert_close(weight_error(w, bits).reshape(w.shape[0], -1), err)
        torch.testing.assert_close(noise.w_var[name], err.var(dim=1, unbiased=False), rtol=1e-5, atol=1e-12)
