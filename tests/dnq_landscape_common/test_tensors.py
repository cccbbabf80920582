"""Per-channel moments against an explicit float64 computation."""

import torch

from dnq_landscape_common.tensors import channel_moments


def test_channel_moments_are_the_population_moments_per_output_channel():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 3, 2, 2, generator=g)
    mean, var = channel_moments(t)
    assert mean.dtype == var.dtype == torch.float64 and mean.shape == var.shape == (5,)
    for c in range(5):
        x = [float(v) for v in t[c].flatten()]
        m = sum(x) / len(x)
        assert abs(float(mean[c]) - m) < 1e-12
        assert abs(float(var[c]) - sum((v - m) ** 2 for v in x) / len(x)) < 1e-12
    # n_c (mean^2 + var) is each channel's sum of squares: what the second-order prediction needs
    n = 12
    assert torch.allclose(n * (mean ** 2 + var), (t.double() ** 2).flatten(1).sum(1), rtol=1e-12)


def test_a_scalar_is_one_channel_and_the_input_is_not_touched():
    t = torch.tensor(2.5, requires_grad=True)
    mean, var = channel_moments(t)
    assert mean.tolist() == [2.5] and var.tolist() == [0.0] and not mean.requires_grad
