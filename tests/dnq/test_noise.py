import io

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from dnq.methods import make_method
from dnq.models import build_model
from dnq.noise import LambdaSchedule, QuantNoise, channel_salience_probs, weight_error_stats


def _setup(name, model, calib, lam=1.0, seed=0):
    method = make_method(name, wbits=3, abits=3)
    method.setup(model, calib, torch.device("cpu"), seed, 0)
    method.on_epoch_start(0, lam)
    return method


def test_differential_noise_leaves_clean_weights_untouched(tiny_cnn):
    model = tiny_cnn.train()
    calib, x, y = torch.randn(64, 1, 8, 8), torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    method = _setup("dnq", model, calib)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, nesterov=True)
    for _ in range(3):
        opt.zero_grad()
        method.step(model, x, y, nn.CrossEntropyLoss(), _null)
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_gradient_is_taken_at_the_perturbed_weights(tiny_cnn):
    model = tiny_cnn.train()
    calib, x, y = torch.randn(64, 1, 8, 8), torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    method = _setup("dnq-w", model, calib, lam=0.7)
    # replay the same draw: the generator is seeded by (seed, epoch)
    gen = torch.Generator().manual_seed(method.w_gen.initial_seed())
    deltas = method.noise.sample_weight_noise(gen)
    names = {id(p): n for n, p in model.named_parameters()}
    params = {n: p.detach() for n, p in model.named_parameters()}
    for p, d in zip(method.noise.params, deltas):
        params[names[id(p)]] = params[names[id(p)]] + 0.7 * d
    params = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    loss = nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
    expected = torch.autograd.grad(loss, list(params.values()))
    model.zero_grad()
    method.step(model, x, y, nn.CrossEntropyLoss(), _null)
    for (_n, p), g in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    clean = [torch.autograd.grad(nn.functional.cross_entropy(model(x), y), p)[0] for p in method.noise.params[:1]]
    assert not torch.allclose(clean[0], method.noise.params[0].grad)  # the noise did change the gradient


def test_gaussian_walk_ablation_accumulates(tiny_cnn):
    model = tiny_cnn.train()
    calib, x, y = torch.randn(64, 1, 8, 8), torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    method = _setup("gaussian-walk", model, calib, lam=0.5)
    gen = torch.Generator().manual_seed(method.w_gen.initial_seed())
    before = [p.detach().clone() for p in method.noise.params]
    d1 = method.noise.sample_weight_noise(gen)
    d2 = method.noise.sample_weight_noise(gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(2):
        method.step(model, x, y, nn.CrossEntropyLoss(), _null)
        opt.step()
    for b, p, a, c in zip(before, method.noise.params, d1, d2):
        torch.testing.assert_close(p.detach(), b + 0.5 * a + 0.5 * c, rtol=1e-6, atol=1e-7)


def test_salience_probabilities_closed_form():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 4)
    p = channel_salience_probs(x, 1, temperature=0.5, rho=0.5)
    sal = x.abs().mean(dim=(2, 3))
    expected = (torch.exp(sal / 0.5) / torch.exp(sal / 0.5).sum(1, keepdim=True) * 5 * 0.5).clamp(0, 1)
    torch.testing.assert_close(p.view(3, 5), expected)
    # tokens (B, N, D): salience over tokens, channels last
    t = torch.randn(2, 7, 6)
    pt = channel_salience_probs(t, -1)
    s = t.abs().mean(1)
    torch.testing.assert_close(pt.view(2, 6), (torch.softmax(s, 1) * 6 * 0.5).clamp(0, 1))


@pytest.mark.parametrize("sampler", ["fresh", "table"])
def test_activation_mask_frequencies_match_probabilities(sampler):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 2, 1)
    model = nn.Sequential(conv).train()
    noise = QuantNoise(model, 4, 4, weight=False, act=True, rho=0.5, temperature=0.3, sampler=sampler).attach()
    noise.a_mean, noise.a_var, noise.order = {"0": 1.0}, {"0": 0.0}, ["0"]  # delta_a == 1: mask is visible
    noise.act_lambda = 1.0
    noise.new_epoch(0)
    x = torch.randn(2, 4, 50, 50)
    seen = []
    conv.register_forward_pre_hook(lambda m, a: seen.append(a[0] - x))  # runs after the noise hook
    model(x)
    mask = seen[0].round()
    torch.testing.assert_close(seen[0], mask, atol=1e-5, rtol=0)  # x + 1 * M * 1 - x is a 0/1 mask
    assert set(torch.unique(mask).tolist()) == {0.0, 1.0}
    p = channel_salience_probs(x, 1, 0.3, 0.5).view(2, 4)
    freq = mask.mean(dim=(2, 3))
    tol = 4 * torch.sqrt(p * (1 - p) / 2500) + 1e-9
    assert torch.all((freq - p).abs() <= tol), (freq, p)
    assert (p == 1).any() or (p < 1).all()  # clipping is exercised by the temperature
    model.eval()
    seen.clear()
    model(x)
    assert torch.equal(seen[0], torch.zeros_like(x))  # no noise outside training


@pytest.mark.parametrize("sampler", ["fresh", "table"])
def test_activation_noise_has_the_measured_mean_and_variance(sampler):
    conv = nn.Linear(64, 2)
    model = nn.Sequential(conv).train()
    noise = QuantNoise(model, 4, 4, weight=False, act=True, rho=1e6, sampler=sampler).attach()  # p == 1 everywhere
    noise.a_mean, noise.a_var, noise.order = {"0": 0.3}, {"0": 0.25}, ["0"]
    noise.act_lambda = 2.0
    noise.new_epoch(1)
    x = torch.zeros(4000, 64)
    seen = []
    conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    for _ in range(3):  # later calls reuse the table at other offsets
        model(x)
    for d in seen:
        assert abs(float(d.mean()) - 2.0 * 0.3) < 4 * 1.0 / 512  # lambda * mu, sd of the mean 1/sqrt(256000)
        assert abs(float(d.std()) - 2.0 * 0.5) < 0.01
    assert not torch.equal(seen[0], seen[1])


def test_weight_stats_ema():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    noise = QuantNoise(model, 3, 3, act=False, beta=0.9)
    calib = torch.randn(8, 16)
    noise.update(calib)
    m1, v1 = weight_error_stats(model, 3)["0"]
    torch.testing.assert_close(noise.w_mean["0"], m1)
    with torch.no_grad():
        model[0].weight.mul_(1.7).add_(0.01)
    noise.update(calib)
    m2, v2 = weight_error_stats(model, 3)["0"]
    torch.testing.assert_close(noise.w_mean["0"], 0.9 * m1 + 0.1 * m2)
    torch.testing.assert_close(noise.w_var["0"], 0.9 * v1 + 0.1 * v2)


def test_noise_state_round_trips_through_weights_only_load(tiny_cnn):
    noise = QuantNoise(tiny_cnn, 4, 4)
    noise.update(torch.randn(32, 1, 8, 8))
    buf = io.BytesIO()
    torch.save(noise.state_dict(), buf)
    buf.seek(0)
    other = QuantNoise(tiny_cnn, 4, 4)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.summary() == noise.summary()


def test_first_last_bits_override():
    torch.manual_seed(0)
    model = build_model("cnn-digits", 10, 1, 8)
    calib = torch.randn(32, 1, 8, 8)
    a = QuantNoise(model, 2, 2)
    a.update(calib)
    b = QuantNoise(model, 2, 2, first_last_bits=8)
    b.update(calib)
    first, last = b.order[0], b.order[-1]
    assert b.w_var[first].mean() < a.w_var[first].mean() / 100  # 8-bit errors are far smaller
    assert b.a_var[last] < a.a_var[last] / 100
    mid = b.order[1]
    torch.testing.assert_close(b.w_var[mid], a.w_var[mid])


def test_lambda_schedule():
    s = LambdaSchedule(lambda_max=2.0, start_epoch=2, warmup_epochs=4)
    assert [s(e) for e in range(8)] == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert LambdaSchedule(1.0, 0, 0)(0) == 1.0
    with pytest.raises(ValueError):
        LambdaSchedule(-1.0)


def test_noise_rejects_bad_bits(tiny_cnn):
    with pytest.raises(ValueError, match="2..8"):
        QuantNoise(tiny_cnn, 1, 4)


@pytest.mark.parametrize("name", ["vit-tiny", "mobilenetv2", "resnet20"])
def test_dnq_step_on_every_architecture(name):
    torch.manual_seed(0)
    model = build_model(name, 10, 3, 32).train()
    calib, x, y = torch.randn(16, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    method = _setup("dnq", model, calib)
    sites = set(method.noise.a_mean)
    assert sites == {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    before = [p.detach().clone() for p in method.noise.params]
    method.step(model, x, y, nn.CrossEntropyLoss(), _null)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert all(torch.equal(a, p) for a, p in zip(before, method.noise.params))


@pytest.mark.parametrize("name", ["gaussian", "gaussian-iso"])
def test_fair_gaussian_draws_and_clean_weights(tiny_cnn, name):
    """The fair baselines: zero mean, the target variance (per channel for ``gaussian``, the
    layer's mean channel variance for ``gaussian-iso``), drawn fresh every step and removed before
    the update: with learning rate 0 the weights stay bit-exact."""
    model = tiny_cnn.train()
    calib, x, y = torch.randn(64, 1, 8, 8), torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    method = _setup(name, model, calib, lam=1.0)
    noise = method.noise
    assert not noise.act and not noise._hooks  # no activation noise
    # the target: the measured per-channel error variance of symmetric min-max quantization at 3 bits,
    # computed here independently of the noise code
    from dnq.quant import quantize_weight
    gen = torch.Generator().manual_seed(1)
    n_draws = 4000
    for (lname, layer), _p in zip(noise.layers, noise.params):
        w = layer.weight.detach().double()
        err = (quantize_weight(w, 3) - w).reshape(w.shape[0], -1)
        target = err.var(dim=1, unbiased=False)
        if name == "gaussian-iso":
            target = target.mean().expand_as(target)
        mean, sd = noise.weight_noise_moments(lname)
        assert torch.equal(mean, torch.zeros_like(mean))
        torch.testing.assert_close(sd.double() ** 2, target, rtol=1e-4, atol=1e-12)
    draws = [torch.stack([noise.sample_weight_noise(gen)[i] for _ in range(n_draws)]) for i in range(len(noise.params))]
    for (lname, _), d in zip(noise.layers, draws):
        d = d.double().reshape(n_draws, d.shape[1], -1)  # (draws, channels, elements)
        _, sd = noise.weight_noise_moments(lname)
        var = sd.double() ** 2
        emp_mean = d.mean(dim=(0, 2))
        emp_var = d.var(dim=(0, 2))
        m = d.shape[0] * d.shape[2]
        # the empirical mean within 5 standard errors of 0, the variance within 5 of its standard errors
        assert (emp_mean.abs() <= 5 * (var / m).sqrt() + 1e-15).all()
        assert ((emp_var - var).abs() <= 5 * var * (2 / (m - 1)) ** 0.5 + 1e-15).all()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, nesterov=True)
    grads = []
    for _ in range(3):
        opt.zero_grad()
        method.step(model, x, y, nn.CrossEntropyLoss(), _null)
        grads.append(noise.params[1].grad.clone())
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # bit-exact clean weights
    assert not torch.equal(grads[0], grads[1])  # a fresh draw every step
