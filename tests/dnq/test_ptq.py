"""PTQ with BatchNorm re-estimation (variant ``rtn+bn``), the ``rtn`` path it must leave alone,
and ``dnq ptq --bn-reestimate`` with a validation split. Every expectation is computed here by
hand (float64 statistics, our own quantizer formulas), never taken from the code under test."""

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dnq.cli import main
from dnq.data import BatchLoader, load_dataset
from dnq.ptq import format_table
from dnq.quant import PTQ_VARIANTS, fold_batchnorm, ptq_variant, quant_layers, quantize, quantize_weight, reestimate_bn
from dnq.train import TrainConfig, evaluate, load_model, train
from tests.conftest import TEST_THREADS, UntraceableConvBN


# ------------------------------------------------------------------------------ hand formulas
def hand_weight_q(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric max-abs per-output-channel quantizer, written out (in w's dtype)."""
    qmax = 2 ** (bits - 1) - 1
    s = (w.reshape(len(w), -1).abs().amax(1) / qmax).clamp_min(1e-12).view(-1, *[1] * (w.dim() - 1))
    return torch.clamp(torch.round(w / s), -qmax, qmax) * s


def hand_act_params(x: torch.Tensor, bits: int) -> tuple[float, float, int]:
    """Asymmetric min-max per-tensor parameters (range widened to contain 0), in Python floats."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    qmax = 2 ** bits - 1
    scale = (hi - lo) / qmax
    return scale, float(min(max(round(-lo / scale), 0), qmax)), qmax


def hand_act_q(x: torch.Tensor, params) -> torch.Tensor:
    scale, zp, qmax = params
    s = torch.tensor(scale, dtype=torch.float32).to(x.dtype)
    return (torch.clamp(torch.round(x / s) + zp, 0, qmax) - zp) * s


def layer_inputs(model: nn.Module, x: torch.Tensor) -> tuple[list[str], dict]:
    """The Conv/Linear layers in call order and their float inputs, from plain forward hooks."""
    order, seen, hooks = [], {}, []

    def record(mod, args, name):
        order.append(name)
        seen[name] = args[0].detach().clone()

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_pre_hook(lambda mod, a, n=name: record(mod, a, n)))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return order, seen


def with_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.4 * torch.rand(n, generator=g) - 0.2)
    return model.eval()


def conv_bn_model() -> nn.Module:
    torch.manual_seed(0)
    return with_bn_stats(nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)))


# ------------------------------------------------------------------- the folding identity
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_per_channel_symmetric_quantizer_commutes_with_a_channel_factor(bits):
    """Q(W f) == f Q(W) for the symmetric max-abs per-channel quantizer, f of either sign, so a
    folded quantized weight is still on a per-channel uniform grid (checked against the hand
    formula, in float64 to see float rounding only)."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(32, 4, 3, 3, generator=g, dtype=torch.float64)
    f = torch.randn(32, generator=g, dtype=torch.float64) * 3
    assert (f < 0).any() and (f > 0).any()
    fv = f.view(-1, 1, 1, 1)
    torch.testing.assert_close(hand_weight_q(w * fv, bits), fv * hand_weight_q(w, bits), rtol=1e-12, atol=1e-12)
    # the library's quantizer computes the scale in float32: the same up to float32 rounding
    torch.testing.assert_close(quantize_weight(w * fv, bits), fv * quantize_weight(w, bits), rtol=1e-6, atol=1e-7)
    fp = fv.abs()  # the asymmetric quantizer: the identity for f > 0
    torch.testing.assert_close(quantize_weight(w * fp, bits, "asymmetric"), fp * quantize_weight(w, bits, "asymmetric"),
                               rtol=1e-6, atol=1e-7)
    # f Q(W) is on the uniform grid of step |f| max|W| / qmax, with at most 2 qmax + 1 levels
    qmax = 2 ** (bits - 1) - 1
    k = fv * hand_weight_q(w, bits) / (fv.abs() * w.abs().amax(dim=(1, 2, 3), keepdim=True) / qmax)
    assert (k - k.round()).abs().max() < 1e-9 and k.abs().max() <= qmax + 1e-9


def test_rtn_bn_weights_before_reestimation_equal_rtn_folded_weights(tiny_cnn):
    calib = torch.randn(64, 1, 8, 8)
    rtn = quantize(tiny_cnn, 3, 4, calib)                    # fold, then quantize
    unfolded = quantize(tiny_cnn, 3, 4, calib, fold_bn=False)  # quantize, not yet folded
    late = fold_batchnorm(unfolded)                          # fold the quantized weights (old statistics)
    a, b = dict(quant_layers(rtn)), dict(quant_layers(late))
    for name in a:
        torch.testing.assert_close(b[name].weight, a[name].weight, rtol=1e-5, atol=1e-6)
    # the activation ranges are the same: re-estimation changes only the BatchNorm statistics
    rb = quantize(tiny_cnn, 3, 4, calib, bn_reestimate=True)
    for d_rtn, d_rb in zip(rtn.ptq_layers, rb.ptq_layers, strict=True):
        assert d_rtn["layer"] == d_rb["layer"] and (d_rtn["wbits"], d_rtn["abits"]) == (d_rb["wbits"], d_rb["abits"])
        assert d_rb["act_lo"] == pytest.approx(d_rtn["act_lo"], rel=1e-5, abs=1e-6)
        assert d_rb["act_hi"] == pytest.approx(d_rtn["act_hi"], rel=1e-5, abs=1e-6)


def test_rtn_bn_folds_the_reestimated_statistics_onto_a_per_channel_grid(tiny_cnn):
    calib = torch.randn(64, 1, 8, 8)
    kept = quantize(tiny_cnn, 3, 4, calib, bn_reestimate=True, fold_bn=False)  # re-estimated, not folded
    folded = quantize(tiny_cnn, 3, 4, calib, bn_reestimate=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(32, 1, 8, 8)
    torch.testing.assert_close(folded(x), kept(x), rtol=1e-4, atol=1e-5)
    wbits = {d["layer"]: d["wbits"] for d in folded.ptq_layers}
    for conv, bn in (("0", "1"), ("3", "4"), ("7", "8")):
        bn_mod = kept.get_submodule(bn)
        f = (bn_mod.weight / torch.sqrt(bn_mod.running_var + bn_mod.eps)).view(-1, 1, 1, 1)
        w_raw = tiny_cnn.get_submodule(conv).weight
        # f * Q(W) with the new statistics, which is Q(f W): quantizing the re-estimated fold directly
        torch.testing.assert_close(folded.get_submodule(conv).weight, f * hand_weight_q(w_raw, wbits[conv]),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(folded.get_submodule(conv).weight, hand_weight_q(w_raw * f, wbits[conv]),
                                   rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ statistics by hand (b)
@pytest.mark.parametrize("batch_size", [64, 16])
def test_reestimated_statistics_equal_a_float64_hand_computation(batch_size):
    model = conv_bn_model()
    g = torch.Generator().manual_seed(1)
    calib = torch.randn(64, 2, 6, 6, generator=g)
    wbits, abits = 3, 4
    q = quantize(model, wbits, abits, calib, first_last_bits=None, fold_bn=False, bn_reestimate=True,
                 batch_size=batch_size)
    assert q.ptq_variant == "rtn+bn" and q.ptq_bn_reestimated == ["1", "4"]

    # first BatchNorm: statistics of the quantized conv's outputs on the quantized inputs
    xq = hand_act_q(calib, hand_act_params(calib, abits)).double()
    conv = model[0]
    y = F.conv2d(xq, hand_weight_q(conv.weight.detach(), wbits).double(), conv.bias.detach().double(), padding=1)
    chunks = y.split(batch_size)
    mean = torch.stack([c.mean(dim=(0, 2, 3)) for c in chunks]).mean(0)
    var = torch.stack([c.var(dim=(0, 2, 3), unbiased=True) for c in chunks]).mean(0)
    bn = q[1]
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == len(chunks)
    assert bn.momentum == model[1].momentum and not bn.training
    if len(chunks) == 1:  # one batch: the mean and unbiased variance over all calibration images
        torch.testing.assert_close(bn.running_var.double(), y.var(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    else:  # several: the average of per-batch variances (cumulative average), not the global variance
        assert not torch.allclose(bn.running_var.double(), y.var(dim=(0, 2, 3)), rtol=1e-4)

    if len(chunks) == 1:
        # second BatchNorm: its input went through the first in train mode (batch statistics,
        # biased variance), then ReLU and the second layer's quantizers; activation ranges come
        # from the float model with the trained statistics
        order, fp_in = layer_inputs(model, calib)
        h = (y - y.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(
            y.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + model[1].eps)
        h = F.relu(h * model[1].weight.detach().double().view(1, -1, 1, 1)
                   + model[1].bias.detach().double().view(1, -1, 1, 1))
        hq = hand_act_q(h, hand_act_params(fp_in[order[1]], abits))
        y2 = F.conv2d(hq, hand_weight_q(model[3].weight.detach(), wbits).double(), padding=1)
        # float32 in the model against float64 here: an activation may round to the other grid point
        torch.testing.assert_close(q[4].running_mean.double(), y2.mean(dim=(0, 2, 3)), rtol=2e-3, atol=2e-4)
        torch.testing.assert_close(q[4].running_var.double(), y2.var(dim=(0, 2, 3)), rtol=2e-3, atol=2e-4)


def test_batchnorm1d_after_linear_is_reestimated_and_stays_a_float_batchnorm():
    torch.manual_seed(0)
    model = with_bn_stats(nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)))
    calib = torch.randn(50, 1, 6, 6)
    q = quantize(model, 4, 4, calib, first_last_bits=None, bn_reestimate=True)
    assert isinstance(q[2], nn.BatchNorm1d)  # not folded: it follows a Linear layer
    xq = hand_act_q(calib.flatten(1), hand_act_params(calib, 4)).double()
    y = F.linear(xq, hand_weight_q(model[1].weight.detach(), 4).double(), model[1].bias.detach().double())
    torch.testing.assert_close(q[2].running_mean.double(), y.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q[2].running_var.double(), y.var(0), rtol=1e-5, atol=1e-6)
    rtn = quantize(model, 4, 4, calib, first_last_bits=None)
    assert torch.equal(rtn[2].running_mean, model[2].running_mean)  # rtn keeps the trained statistics


def test_reestimate_bn_in_place_restores_modes_and_refuses_bad_input():
    model = conv_bn_model().train()
    model[2].training = False  # a mixed state, restored as found
    modes = [m.training for m in model.modules()]
    x = torch.randn(40, 2, 6, 6)
    assert reestimate_bn(model, x, batch_size=40) is model
    assert [m.training for m in model.modules()] == modes
    with torch.no_grad():
        y = model[0](x)
    torch.testing.assert_close(model[1].running_mean, y.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="calib_data is empty"):
        reestimate_bn(model, torch.empty(0, 2, 6, 6))
    with pytest.raises(ValueError, match="calib_data is empty"):
        reestimate_bn(model, iter([]))
    with pytest.raises(ValueError, match="batch_size"):
        reestimate_bn(model, x, batch_size=0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # statistics not left reset

    lin = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    with pytest.raises(ValueError, match="at least 2 samples"):
        reestimate_bn(lin, torch.randn(5, 4), batch_size=2)  # the last batch holds one sample


# ------------------------------------------------------------- rtn unchanged, bit for bit (c)
def hand_rtn(model: nn.Module, wbits: int, abits: int, calib: torch.Tensor, first_last_bits: int = 8) -> nn.Module:
    """The ``rtn`` PTQ written out: fold, per-channel symmetric max-abs weights, per-tensor
    asymmetric min-max input quantizers calibrated on the folded float model."""
    folded = fold_batchnorm(model)
    order, inputs = layer_inputs(folded, calib)
    edge = {order[0], order[-1]}
    expected = copy.deepcopy(folded)
    for name in order:
        wb, ab = (first_last_bits, first_last_bits) if name in edge else (wbits, abits)
        layer = expected.get_submodule(name)
        with torch.no_grad():
            layer.weight.copy_(hand_weight_q(layer.weight, wb))
        params = hand_act_params(inputs[name], ab)
        layer.register_forward_pre_hook(lambda m, a, p=params: (hand_act_q(a[0], p),))
    return expected


@pytest.mark.parametrize("arch", ["cnn-digits", "resnet20"])
def test_rtn_output_is_bit_identical_to_the_hand_written_path(arch):
    from dnq.models import build_model

    torch.manual_seed(0)
    c = 1 if arch == "cnn-digits" else 3
    model = with_bn_stats(build_model(arch, 10, c, 8))
    calib = torch.randn(96, c, 8, 8)
    q = quantize(model, 3, 4, calib)
    assert q.ptq_variant == "rtn" and q.ptq_bn_reestimated == []
    expected = hand_rtn(model, 3, 4, calib)
    x = torch.randn(16, c, 8, 8)
    with torch.no_grad():
        assert torch.equal(q(x), expected(x))
    for (n, a), (_, b) in zip(quant_layers(q), quant_layers(expected), strict=True):
        assert torch.equal(a.weight, b.weight), n


def test_model_without_batchnorm_gives_the_rtn_model_with_a_warning():
    from dnq.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp-digits", 10, 1, 8).eval()
    calib = torch.randn(64, 1, 8, 8)
    rtn = quantize(model, 3, 4, calib)
    with pytest.warns(UserWarning, match="without BatchNorm"):
        rb = quantize(model, 3, 4, calib, bn_reestimate=True)
    assert rb.ptq_variant == "rtn+bn" and rb.ptq_bn_reestimated == []
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(rb(x), rtn(x))


def test_untraceable_model_keeps_a_reestimated_float_batchnorm():
    model = UntraceableConvBN().eval()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        q = quantize(model, 8, 8, torch.randn(8, 1, 8, 8), first_last_bits=None, bn_reestimate=True)
    assert any("not folded" in str(x.message) for x in w)
    assert isinstance(q.bn, nn.BatchNorm2d) and int(q.bn.num_batches_tracked) == 1
    assert not torch.equal(q.bn.running_var, model.bn.running_var)  # 1.0 before: re-estimated


def test_generator_calibration_data_is_read_for_both_passes(tiny_cnn):
    calib = torch.randn(64, 1, 8, 8)
    a = quantize(tiny_cnn, 3, 4, calib, bn_reestimate=True, batch_size=32)
    b = quantize(tiny_cnn, 3, 4, (x for x in calib.split(32)), bn_reestimate=True)
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_bad_input_is_refused_at_the_entry_point(tiny_cnn):
    x = torch.randn(8, 1, 8, 8)
    with pytest.raises(ValueError, match="calib_data is empty"):
        quantize(tiny_cnn, 4, 4, torch.empty(0, 1, 8, 8), bn_reestimate=True)
    with pytest.raises(ValueError, match="True or False"):
        quantize(tiny_cnn, 4, 4, x, bn_reestimate="yes")
    with pytest.raises(ValueError, match="batch_size"):
        quantize(tiny_cnn, 4, 4, x, batch_size=0)
    with pytest.raises(ValueError, match="symmetric, asymmetric"):
        quantize(tiny_cnn, 4, 4, x, weight_mode="per-tensor")
    assert PTQ_VARIANTS == ("rtn", "rtn+bn") and ptq_variant(False) == "rtn" and ptq_variant(True) == "rtn+bn"


# --------------------------------------------------------------------- original untouched (e)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bn_reestimate_never_touches_the_original(tiny_cnn, mode):
    model = tiny_cnn.train(mode == "train")
    model[4].training = not model[4].training  # a mixed state too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    q = quantize(model, 2, 4, torch.randn(64, 1, 8, 8), bn_reestimate=True)
    assert q is not model and not q.training
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
    assert [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == momenta
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks


# ------------------------------------------------------------------- a trained model (a, d)
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A cnn-digits trained briefly on digits; its model.pt metadata names a validation split
    of 300 images (seed 1), as runs written with a validation split do."""
    torch.set_num_threads(TEST_THREADS)
    out = tmp_path_factory.mktemp("ptq_bn") / "run"
    train(TrainConfig(data="digits", model="cnn-digits", method="sgd", epochs=15, out=str(out), device="cpu", seed=0),
          quiet=True)
    blob = torch.load(out / "model.pt", weights_only=True)
    blob["meta"] = {**blob["meta"], "val_size": 300, "val_seed": 1}
    torch.save(blob, out / "model.pt")
    return out


def test_w8a8_bn_reestimation_keeps_accuracy_and_w2a4_recovers(digits_run):
    model, _ = load_model(digits_run)
    ds = load_dataset("digits", val_size=300, val_seed=1)
    test = BatchLoader(ds, 1024, False)
    # the whole training split: the re-estimated statistics are then population statistics, as
    # the trained ones are, rather than a 256-image sample (whose sampling noise alone moved W8A8
    # test accuracy by up to 2 of 360 images in runs of 6 to 15 epochs, seeds 0 and 1)
    calib = ds.calibration_inputs(len(ds.x_train), 0)
    fp_loss, fp = evaluate(model, test)
    res = {v: evaluate(quantize(model, 8, 8, calib, first_last_bits=8, batch_size=len(calib),
                                bn_reestimate=v == "rtn+bn"), test) for v in PTQ_VARIANTS}
    acc = {v: r[1] for v, r in res.items()}
    assert fp > 0.95
    # at 8 bits quantization barely moves the BatchNorm inputs: re-estimating the statistics
    # must change test accuracy by less than half a point (at most 1 of 360 images)
    assert abs(acc["rtn+bn"] - acc["rtn"]) < 0.005 and abs(acc["rtn+bn"] - fp) < 0.005, (fp, acc)
    assert abs(res["rtn+bn"][0] - fp_loss) < 0.02 * fp_loss, (fp_loss, res)
    # at W2A4 the statistics are far off and re-estimating them recovers most of the accuracy
    # (measured 0.25-0.43 -> 0.92-0.95 on such runs)
    calib = ds.calibration_inputs(256, 0)
    low = {v: evaluate(quantize(model, 2, 4, calib, bn_reestimate=v == "rtn+bn"), test)[1] for v in PTQ_VARIANTS}
    assert low["rtn+bn"] > low["rtn"] + 0.3, low


def test_cli_bn_reestimate_reports_both_variants_in_separate_columns(digits_run, capsys, monkeypatch):
    import dnq.ptq

    seen = []
    real = dnq.ptq.quantize
    monkeypatch.setattr(dnq.ptq, "quantize", lambda model, w, a, calib, **kw: seen.append(calib) or real(
        model, w, a, calib, **kw))
    assert main(["ptq", str(digits_run), "--bits", "W8A8,W2A4", "--range", "minmax,mse", "--bn-reestimate",
                 "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    report = json.loads((digits_run / "ptq.json").read_text())

    rows = {(r["bits"], r["range"], r["variant"]): r for r in report["results"]}
    assert set(rows) == {(b, r, v) for b in ("W8A8", "W2A4") for r in ("minmax", "mse") for v in ("rtn", "rtn+bn")}
    assert all(r["bn_reestimated"] == (3 if r["variant"] == "rtn+bn" else 0) for r in rows.values())
    s = report["settings"]
    assert s["bn_reestimate"] is True and set(s["variants"]) == {"rtn", "rtn+bn"}
    assert s["weight_mode"] == "symmetric" and s["weight_granularity"] == "per output channel"
    assert "asymmetric" in s["activations"] and "per tensor" in s["activations"]
    assert s["first_last_bits"] == 8 and s["fold_bn"] is True and s["calib_size"] == 256
    assert "training split" in s["calib_split"] and "300 validation images excluded" in s["calib_split"]

    # the validation split of the run's metadata: sizes, FP numbers, calibration from the rest
    ds = load_dataset("digits", val_size=300, val_seed=1)
    assert report["data"] == {"dataset": "digits", "train_size": 1437 - 300, "val_size": 300, "val_seed": 1,
                              "test_size": 360, "calibration": "train"}
    model, _ = load_model(digits_run)
    val_loss, val_acc = evaluate(model, BatchLoader(ds, 1024, False, split="val"))
    test_loss, test_acc = evaluate(model, BatchLoader(ds, 1024, False))
    assert report["fp"] == pytest.approx({"val_acc": val_acc, "val_loss": val_loss, "test_acc": test_acc,
                                          "test_loss": test_loss})
    assert all(r["val_acc"] is not None and r["test_acc"] is not None for r in rows.values())
    expected_calib = ds.calibration_inputs(256, 0)
    assert len(seen) == 8 and all(torch.equal(c, expected_calib) for c in seen)

    # the printed tables: one column per (range, variant), values as in ptq.json
    lines = out.splitlines()
    i = lines.index(next(ln for ln in lines if ln.startswith("test accuracy")))
    header = lines[i + 1].split()
    assert header == ["setting", "minmax", "minmax+bn", "mse", "mse+bn"]
    w2 = next(ln for ln in lines[i + 1:] if ln.startswith("W2A4")).split()
    want = [f"{100 * rows[('W2A4', r, v)]['test_acc']:.2f}%" for r in ("minmax", "mse") for v in ("rtn", "rtn+bn")]
    assert w2[1:] == want
    assert lines[0].startswith("validation accuracy (300 images)")
    assert lines[1].split() == header

    # without the flag: rtn rows only, still named, and the plain columns
    assert main(["ptq", str(digits_run), "--bits", "W2A4", "--range", "minmax", "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    report2 = json.loads((digits_run / "ptq.json").read_text())
    assert [r["variant"] for r in report2["results"]] == ["rtn"] and report2["settings"]["bn_reestimate"] is False
    assert report2["results"][0]["test_acc"] == rows[("W2A4", "minmax", "rtn")]["test_acc"]
    assert "minmax+bn" not in out and "+bn" not in "".join(report2["settings"]["variants"])


def test_format_table_of_an_older_report_without_variants():
    report = {"fp": {"test_acc": 0.99, "test_loss": 0.1},
              "results": [{"bits": "W4A4", "range": "minmax", "test_acc": 0.5},
                          {"bits": "W4A4", "range": "mse", "test_acc": 0.75}]}
    assert format_table(report).splitlines() == [
        "setting       minmax         mse",
        "FP            99.00%      99.00%",
        "W4A4          50.00%      75.00%"]
    assert format_table(report, "val_acc").splitlines()[2].split() == ["W4A4", "n/a", "n/a"]
    with pytest.raises(ValueError, match="test_acc"):
        format_table(report, "acc")


def test_apply_ptq_is_the_one_dispatch_and_refuses_what_a_method_cannot_do(tiny_cnn):
    from dnq.ptq import apply_ptq
    from dnq.quant import quantize

    calib = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for method in ("rtn", "rtn+bn"):
        q = apply_ptq(tiny_cnn, method, 4, 4, calib, seed=3)
        ref = quantize(tiny_cnn, 4, 4, calib, seed=3, bn_reestimate=method == "rtn+bn")
        assert q.ptq_method == q.ptq_variant == method
        assert torch.equal(q(x), ref(x))
    with pytest.raises(ValueError, match="symmetric per channel"):
        apply_ptq(tiny_cnn, "qdrop", 4, 4, calib, weight_mode="asymmetric")
    with pytest.raises(ValueError, match="fold BatchNorm first"):
        apply_ptq(tiny_cnn, "adaround", 4, 4, calib, fold_bn=False)
    with pytest.raises(ValueError, match="unknown PTQ method 'nope'; valid: rtn, rtn\\+bn, adaround, brecq, qdrop"):
        apply_ptq(tiny_cnn, "nope", 4, 4, calib)
