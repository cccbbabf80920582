"""What each quantization convention means (issue 23): quantizer places, weight grids, QDrop's
mixing, AdaRound's loss, the learning rates, and the records."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dnq.act_sites import ConventionError, paper_sites
from dnq.cli import main
from dnq.convention import CONVENTIONS, check_convention, describe
from dnq.models import build_model
from dnq.ptq import apply_ptq
from dnq.quant import fold_batchnorm, quantize_weight
from dnq.quant_paper import paper_mse_range, paper_quantize_weight, quantize_paper
from dnq.recon import LSQActQuantizer, default_lrs, reconstruct
from dnq.recon_step import UnitStep


# ----------------------------------------------------------------------------- places
@pytest.mark.parametrize("name, blocks, internal", [
    ("resnet20", 9, [1] * 9),
    ("resnet56", 27, [1] * 27),
    ("resnet18", 8, [1] * 8),
    ("mobilenetv2", 17, [1] + [2] * 16),
])
def test_paper_sites_per_block(name, blocks, internal):
    """Per block: its output after the add and activation, plus one input per layer that reads an
    activation made inside the block (basic block: conv2; inverted residual: the depthwise and the
    projection, one fewer without expansion); outside blocks: the stem after its activation and,
    for MobileNetV2, the last 1x1 layer; the classifier's output never."""
    sites = paper_sites(fold_batchnorm(build_model(name, 100)))
    outs = [s for s in sites if s.kind == "output" and s.unit == s.module]
    inner = [s for s in sites if s.kind == "input"]
    block_names = [s.unit for s in outs if not s.unit.endswith((".0.0",)) and s.unit not in ("conv1",)]
    assert len([u for u in block_names if "conv" not in u.split(".")[-1]]) == blocks
    per_block = [len([s for s in inner if s.unit == b]) for b in dict.fromkeys(s.unit for s in inner)]
    assert per_block == internal
    layer_sites = [s for s in sites if s.unit not in {x.unit for x in inner} and s.unit not in block_names]
    assert [s.unit for s in layer_sites] == (["features.0.0", "features.18.0"] if name == "mobilenetv2" else
                                             ["conv1"])
    assert [s.name for s in sites if s.last] == [sites[-1].name]
    assert not any(s.unit in ("fc", "classifier.1") for s in sites)  # the network's output is not quantized


def test_paper_places_in_the_quantized_resnet20():
    """The values at the places are on the quantizer's grid, the values not at a place are not:
    the image, conv2's output before the add, the shortcut's output."""
    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    x = torch.randn(32, 3, 32, 32)
    q = quantize_paper(model, 4, 4, x)
    seen = {}

    def keep(name):
        return lambda m, a, out: seen.__setitem__(name, (a[0].detach(), out.detach()))

    for name in ("conv1", "layers.0", "layers.0.conv2", "layers.3", "layers.3.shortcut.0", "layers.8", "fc"):
        q.get_submodule(name).register_forward_hook(keep(name))
    q(x[:8])
    levels = lambda t: t.unique().numel()  # noqa: E731
    assert levels(seen["conv1"][0]) > 1000  # the image is not quantized
    assert levels(seen["layers.0"][1]) <= 16 and levels(seen["layers.3"][1]) <= 16  # block outputs, A4
    assert levels(seen["layers.0.conv2"][0]) <= 16  # conv1 + ReLU inside the block
    assert levels(seen["layers.0.conv2"][1]) > 1000 and levels(seen["layers.3.shortcut.0"][1]) > 1000
    assert levels(seen["layers.0"][0]) <= 16  # the stem's output after its ReLU, A4 (QDrop)
    assert 16 < levels(seen["layers.8"][1]) <= 256  # the last quantizer, feeding the classifier: 8 bits
    sites = {s["site"]: s["abits"] for s in q.ptq_sites}
    assert sites["conv1"] == 4 and sites["layers.8"] == 8 and len(sites) == 19


def test_dnq_places_are_the_layer_inputs():
    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    q = apply_ptq(model, "rtn", 4, 4, torch.randn(32, 3, 32, 32))
    assert q.ptq_convention == "dnq" and not hasattr(q, "ptq_sites")
    assert sum(hasattr(m, "input_quantizer") for m in q.modules()) == 22  # 19 convolutions, 2 shortcuts, fc


def test_paper_convention_refuses_transformers_with_the_way_out():
    with pytest.raises(ConventionError, match="--convention dnq"):
        paper_sites(build_model("vit-tiny", 10))


# ----------------------------------------------------------------------------- weight grids
def test_weight_grid_levels_by_hand():
    """Row [-1, -0.2, 0.35, 2], min-max. paper, asymmetric on 2^b levels: W2 scale 3/3 = 1 and zero
    point round(1/1) = 1, the grid {-1, 0, 1, 2}; W3 scale 3/7, zero point round(7/3) = 2, the grid
    (k - 2) 3/7; W4 scale 3/15 = 0.2, zero point 5, the grid (k - 5) 0.2. dnq, symmetric on
    2^b - 1 levels: W2 scale 2/1, the grid {-2, 0, 2}."""
    w = torch.tensor([[-1.0, -0.2, 0.35, 2.0]], dtype=torch.float64)
    got = {b: paper_quantize_weight(w, b, "minmax")[0].tolist() for b in (2, 3, 4)}
    assert got[2] == pytest.approx([-1.0, 0.0, 0.0, 2.0])
    s3 = 3 / 7  # -1/s3 = -2.33 -> -2; -0.2/s3 = -0.47 -> 0; 0.35/s3 = 0.82 -> 1; 2/s3 = 4.67 -> 5
    assert got[3] == pytest.approx([-2 * s3, 0.0, s3, 5 * s3])
    assert got[4] == pytest.approx([-1.0, -0.2, 0.4, 2.0])  # 0.35 / 0.2 = 1.75 -> 2
    assert quantize_weight(w, 2, "symmetric", "minmax")[0].tolist() == pytest.approx([0.0, 0.0, 0.0, 2.0])
    dense = torch.linspace(-1, 2, 1001, dtype=torch.float64)[None]
    for b in (2, 3, 4):
        assert paper_quantize_weight(dense, b, "minmax").unique().numel() == 2 ** b
        assert quantize_weight(dense, b, "symmetric", "minmax").unique().numel() <= 2 ** b - 1


def test_paper_mse_range_is_qdrops_search():
    """One-sided data searches [0, i/100 max]; the L2.4 optimum of a uniform [0, 1] at 2 bits clips."""
    x = torch.linspace(0, 1, 4001)
    lo, hi = paper_mse_range(x, 2, per_channel=False)
    cands = torch.arange(1, 101) / 100
    errs = []
    for t in cands:
        s = t / 3
        q = (torch.clamp(torch.round(x / s), 0, 3)) * s
        errs.append((q - x).abs().pow(2.4).mean())
    assert float(lo) == 0 and float(hi) == pytest.approx(float(cands[int(torch.stack(errs).argmin())]), rel=1e-6)


# ----------------------------------------------------------------------------- QDrop's mixing
class _TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        from dnq.models.resnet import BasicBlock

        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.layers = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 8, 1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_qdrop_mixes_the_float_models_block_input(monkeypatch):
    """The second block's step gets the float model's block input (not the quantized model's
    float activations) and the probability of staying quantized; every quantizer of the block is
    left in float with the complement."""
    torch.manual_seed(0)
    model = _TwoBlocks().eval()
    x = torch.randn(64, 3, 8, 8)
    seen = []

    class Spy(UnitStep):
        def __init__(self, unit, qx, fy, **kw):
            seen.append({"qx": qx.clone(), "fx": None if kw["fx"] is None else kw["fx"].clone(), "mix": kw["mix"],
                         "drops": [m.drop_prob for m in unit.modules() if isinstance(m, LSQActQuantizer)]})
            super().__init__(unit, qx, fy, **kw)

    monkeypatch.setattr("dnq.recon.UnitStep", Spy)
    reconstruct(model, 4, 4, x, "qdrop", iters=2, convention="paper", drop_prob=0.8)
    fp = fold_batchnorm(model)
    with torch.no_grad():
        float_in = fp.layers[0](F.relu(fp.conv1(x)))  # the float model's input to block 2
    block2 = seen[2]
    assert block2["mix"][0] == pytest.approx(0.8)
    assert torch.allclose(block2["fx"], float_in, atol=1e-6)
    assert block2["qx"].unique().numel() <= 16 and not torch.allclose(block2["qx"], float_in, atol=1e-3)
    assert block2["drops"] and all(d == pytest.approx(0.2) for d in block2["drops"])


def test_unit_step_mixing_probability():
    """With P(quantized) = 0.8 the unit sees the quantized input in 80% of the elements."""
    qx, fx = torch.zeros(64, 50), torch.ones(64, 50)
    got = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            got.append(x.detach().clone())
            return x * (1 + self.w)

    from dnq.recon import AdaRoundWeight

    probe = Probe()
    soft = AdaRoundWeight(torch.randn(3, 4), 4)
    step = UnitStep(probe, qx, torch.zeros(64, 50), device=torch.device("cpu"), iters=20, batch_size=32,
                    generator=torch.Generator().manual_seed(0), soft=[soft], weight_lr=0.0, fx=fx,
                    mix=(0.8, torch.Generator().manual_seed(1)))
    step.run()
    frac_float = torch.cat(got).mean()
    assert abs(float(frac_float) - 0.2) < 0.01


def test_step_sizes_positive_on_every_forward():
    probe = nn.Linear(4, 4)
    lsq = LSQActQuantizer(0.1, 0.0, 0, 15, 4)
    with torch.no_grad():
        lsq.scale.fill_(-0.3)
    seen = []
    fwd = lambda x: (seen.append(float(lsq.scale)), lsq(probe(x)))[1]  # noqa: E731
    step = UnitStep(probe, torch.randn(16, 4), torch.randn(16, 4), device=torch.device("cpu"), iters=3, batch_size=8,
                    generator=torch.Generator().manual_seed(0), scales=[lsq.scale], act_lr=0.0, forward=fwd,
                    positive_scales=True)
    step.run()
    assert seen == pytest.approx([0.3, 0.3, 0.3])


# ----------------------------------------------------------------------------- AdaRound's loss
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_adaround_loss_through_the_activation(convention):
    """The first unit's loss before learning (round to nearest) by hand: under paper on
    ``relu(conv(x))`` with the asymmetric grid, under dnq on ``conv(x)`` with the symmetric one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 3)).eval()
    x = torch.randn(40, 1, 8, 8)
    q = reconstruct(model, 4, 4, x, "adaround", iters=1, convention=convention, first_last_bits=None,
                    range_method="minmax")
    conv = model[0]
    if convention == "paper":
        wq = paper_quantize_weight(conv.weight.detach(), 4, "minmax")
        f = F.relu
    else:
        wq = quantize_weight(conv.weight.detach(), 4, "symmetric", "minmax")
        f = lambda t: t  # noqa: E731
    with torch.no_grad():
        # AdaRound reconstructs with float activations in both conventions
        pred, target = f(F.conv2d(x, wq, conv.bias)), f(conv(x))
        expected = float((pred - target).pow(2).sum(1).mean())
    assert q.ptq_recon["units"][0]["loss_before"] == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- rates and records
def test_learning_rates():
    assert default_lrs("brecq", 20000, 5000, "paper", "paper") == (1e-3, 4e-4)
    assert default_lrs("qdrop", 20000, 5000, "paper", "paper") == (1e-3, 4e-5)
    assert default_lrs("qdrop", 500, 125, "scaled", "paper") == pytest.approx((0.04, 1.6e-3))
    assert default_lrs("brecq", 500, 125, "scaled", "paper") == pytest.approx((0.04, 0.016))
    assert default_lrs("brecq", 20000, 5000, "scaled", "dnq") == pytest.approx((1e-3, 1.6e-4))  # the old rule, kept
    torch.manual_seed(0)
    q = reconstruct(build_model("cnn-digits", 10, 1, 8).eval(), 4, 4, torch.randn(32, 1, 8, 8), "brecq", iters=4,
                    convention="paper")
    assert (q.ptq_recon["weight_lr"], q.ptq_recon["act_lr"], q.ptq_recon["lr_rule"]) == (1e-3, 4e-4, "paper")


def test_conventions_are_validated():
    assert check_convention("paper") == "paper"
    with pytest.raises(ValueError, match="valid: dnq, paper"):
        check_convention("brecq")
    with pytest.raises(ValueError, match="asymmetric"):
        apply_ptq(build_model("cnn-digits", 10, 1, 8), "rtn", 4, 4, torch.randn(8, 1, 8, 8), convention="paper",
                  weight_mode="symmetric")
    assert describe("paper")["source"].startswith("BRECQ")


def test_dnq_ptq_prints_and_records_the_convention(tmp_path, capsys):
    from dnq.train import TrainConfig, train

    out = tmp_path / "run"
    train(TrainConfig(data="digits", model="cnn-digits", method="sgd", epochs=1, out=str(out), device="cpu"),
          quiet=True)
    assert main(["ptq", str(out), "--bits", "W4A4", "--range", "minmax", "--method", "rtn,qdrop", "--iters", "2",
                 "--convention", "paper", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "quantization convention: paper (BRECQ" in printed
    report = json.loads((out / "ptq.json").read_text())
    assert report["settings"]["convention"]["convention"] == "paper"
    assert report["settings"]["weight_mode"] == "asymmetric"
    assert {r["convention"] for r in report["results"]} == {"paper"}
    qdrop = next(r for r in report["results"] if r["method"] == "qdrop")
    assert qdrop["recon"]["drop_prob_meaning"].startswith("probability an element stays quantized")
    assert [s["abits"] for s in qdrop["sites"]] == [4, 4, 8]


def test_paper_qdrop_on_each_device_is_seeded_and_captured(device):
    """The paper convention's QDrop step (input mixing, positive step sizes, output sites) runs on
    every device; the same seed gives the same model; on CUDA the step is replayed as a graph."""
    torch.manual_seed(0)
    model = _TwoBlocks().eval().to(device)
    x = torch.randn(64, 3, 8, 8, device=device)
    runs = [reconstruct(model, 4, 4, x, "qdrop", iters=8, convention="paper", seed=3) for _ in range(2)]
    a, b = (r.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(u["loss_after"] == u["loss_after"] for u in runs[0].ptq_recon["units"])  # finite, not NaN
    assert runs[0].ptq_recon["cuda_graph"] is (torch.device(device).type == "cuda")
    with torch.no_grad():
        assert torch.isfinite(runs[0](x)).all()
