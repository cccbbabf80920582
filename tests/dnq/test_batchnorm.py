"""The one BatchNorm rule: every method's final statistics are recomputed on the clean final
weights over one pass of the training loader, checked against a float64 pass written out here."""

import json

import pytest
import torch
import torch.nn as nn

from dnq.batchnorm import batchnorm_layers, recompute_bn
from dnq.data import BatchLoader, load_dataset
from dnq.train import TrainConfig, load_model, train


def _fresh_pass_stats(model: nn.Module, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per BatchNorm layer: the average over batches of the batch mean and unbiased variance of
    its input, in float64, with the layers normalizing by batch statistics (training-mode
    BatchNorm) and nothing else in training mode. Written independently of ``recompute_bn``."""
    bns = batchnorm_layers(model)
    sums = [[0.0, 0.0] for _ in bns]
    count = [0]

    def hook(i):
        def f(mod, args):
            x = args[0].detach().double()
            dims = [0] + list(range(2, x.dim()))
            sums[i][0] = sums[i][0] + x.mean(dim=dims)
            sums[i][1] = sums[i][1] + x.var(dim=dims, unbiased=True)
        return f

    model.eval()
    for bn in bns:
        bn.train()
        bn.momentum = 0.0  # batch statistics for the forward, running statistics untouched
    handles = [bn.register_forward_pre_hook(hook(i)) for i, bn in enumerate(bns)]
    with torch.no_grad():
        for x, _ in batches:
            model(x)
            count[0] += 1
    for h in handles:
        h.remove()
    return [(m / count[0], v / count[0]) for m, v in sums]


@pytest.mark.parametrize("method", ["sgd", "dnq"])
def test_final_statistics_equal_a_fresh_pass_over_the_training_loader(tmp_path, method):
    out = tmp_path / method
    cfg = TrainConfig(method=method, epochs=2, out=str(out), seed=4)
    res = train(cfg, quiet=True)
    assert res["bn"] == "recomputed" and res["bn_as_trained"] is not None
    model, meta = load_model(out)
    ds = load_dataset("digits", val_size=meta["val_size"], val_seed=meta["val_seed"])
    loader = BatchLoader(ds, cfg.batch_size, True, cfg.seed)  # as training presents it
    loader.set_epoch(cfg.epochs)  # the trainer's pass after the last epoch
    saved = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in batchnorm_layers(model)]
    expected = _fresh_pass_stats(model, loader)
    assert len(saved) == len(expected) >= 2
    for (m, v), (em, ev) in zip(saved, expected):
        torch.testing.assert_close(m.double(), em, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v.double(), ev, rtol=1e-5, atol=1e-6)
    # the per-epoch numbers used the statistics accumulated in training; the final line and
    # result.json the recomputed ones
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["final"] and lines[-1]["val_acc"] == res["val_acc"] and lines[-1]["bn"] == "recomputed"


def test_no_bn_recompute_keeps_the_trained_statistics(tmp_path):
    out = tmp_path / "run"
    res = train(TrainConfig(method="dnq", epochs=2, out=str(out), bn_recompute=False), quiet=True)
    assert res["bn"] == "as trained" and res["bn_as_trained"] is None
    final = torch.load(out / "model.pt", weights_only=True)["model"]
    last = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    bn_keys = [k for k in final if "running" in k]
    assert bn_keys and all(torch.equal(final[k], last[k]) for k in bn_keys)


def test_recompute_restores_modes_and_momenta_and_refuses_no_data():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.Dropout(0.5), nn.ReLU())
    model.train()
    model[2].eval()  # a mixed state the caller chose
    n = recompute_bn(model, [torch.randn(8, 1, 6, 6) for _ in range(3)])
    assert n == 24 and model[1].momentum == 0.3 and model[1].training and not model[2].training
    assert int(model[1].num_batches_tracked) == 3
    with pytest.raises(ValueError, match="at least one batch"):
        recompute_bn(model, [])
    assert recompute_bn(nn.Linear(3, 2), [torch.randn(2, 3)]) == 0  # no BatchNorm: nothing to do


def test_dropout_stays_off_during_the_recompute():
    """Only BatchNorm runs in training mode: with dropout on, the statistics would differ."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.BatchNorm1d(16))
    xs = [torch.randn(32, 5) for _ in range(4)]
    recompute_bn(model, xs)
    with torch.no_grad():
        means = torch.stack([model[0](x).mean(0) for x in xs]).mean(0)  # dropout off: identity
    torch.testing.assert_close(model[2].running_mean, means, rtol=1e-5, atol=1e-6)
