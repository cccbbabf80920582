"""ONNX QDQ export (dnq.export): the file against the fake-quantized model, the integer semantics, the command."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from dnq.data import load_dataset
from dnq.models import build_model
from dnq.models.resnet import CifarResNet
from dnq.ptq import apply_ptq
from dnq.quant import ActQuantizer, WeightGrid, _quantize_input_hook, fake_quantize, quantize
from dnq.train import TrainConfig, load_model, train
from tests.conftest import run_dnq

onnx = pytest.importorskip("onnx", reason="the export extra (onnx) is part of dev: pip install -e '.[dev]'")
ort = pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is part of dev")

from dnq.export import (  # noqa: E402 - after the importorskip of the extra
    ExportError,
    Normalization,
    build_onnx,
    export_run,
    round_trip,
    sidecar_path,
    to_onnx,
)
from dnq.export.roundtrip import onnx_logits, session, torch_logits  # noqa: E402


def _init(proto, name):
    return next(t for t in proto.graph.initializer if t.name == name)


def _stored_weight(proto, layer: str) -> np.ndarray:
    """A weight dequantized from the file's integers, scales and zero points with numpy."""
    from onnx import numpy_helper

    base = layer.replace(".", "_")
    q = numpy_helper.to_array(_init(proto, f"{base}_weight_q")).astype(np.float32)
    s = numpy_helper.to_array(_init(proto, f"{base}_weight_scale"))
    z = numpy_helper.to_array(_init(proto, f"{base}_weight_zero_point")).astype(np.float32)
    view = (-1,) + (1,) * (q.ndim - 1)
    return (q - z.reshape(view)) * s.reshape(view)


# -- a trained digits model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    train(TrainConfig(data="digits", model="cnn-digits", method="sgd", epochs=12, out=str(out), device="cpu", seed=0),
          quiet=True)
    model, meta = load_model(out)
    ds = load_dataset("digits", val_size=meta["val_size"], val_seed=meta["val_seed"])
    return out, model, ds


# the grid on digits: W8A8, W4A4, W2A4 x rtn, rtn+bn, qdrop, both conventions
GRID = [(c, b, m) for c in ("dnq", "paper") for b in ((8, 8), (4, 4), (2, 4)) for m in ("rtn", "rtn+bn", "qdrop")]


@pytest.mark.parametrize("convention,bits,method", GRID, ids=[f"{c}-W{b[0]}A{b[1]}-{m}" for c, b, m in GRID])
def test_onnxruntime_computes_the_fake_quantized_model(digits, convention, bits, method):
    _, model, ds = digits
    calib = ds.calibration_inputs(256, 0)
    q = apply_ptq(model, method, *bits, calib, convention=convention, iters=40)
    norm = Normalization.of_dataset(ds)
    proto, info = build_onnx(q, calib[:2], normalization=norm)
    r = round_trip(q, proto, ds.x_test, ds.y_test, norm)  # runs onnx.checker first
    assert abs(r["acc_onnx"] - r["acc_ours"]) <= 0.1 and r["agreement"] >= 0.995, r
    # a value within float rounding of a level boundary may round to the neighbouring level (the two add in different
    # orders): measured up to 5.6% of the images reached by such a flip; a semantic difference (a zero point, a clip,
    # the normalization) reaches them all
    assert r["n"] == len(ds.y_test) and r["images_differing"] <= 0.1, r
    # every weight in the file is the model's weight, read back from its integers with numpy
    mods = dict(q.named_modules())
    for w in info["weights"]:
        assert np.array_equal(_stored_weight(proto, w["layer"]), mods[w["layer"]].weight.detach().numpy())


def test_weights_are_stored_as_int4_and_int2_where_the_opset_allows(digits):
    _, model, ds = digits
    calib = ds.calibration_inputs(256, 0)
    q = apply_ptq(model, "rtn", 4, 4, calib, bits_by_layer={"3": 2})  # one layer at 2 bits
    kinds = {}
    for opset in (13, 21, 25):
        proto, info = build_onnx(q, calib[:2], opset=opset)
        kinds[opset] = {w["layer"]: onnx.TensorProto.DataType.Name(_init(proto, f"{w['layer']}_weight_q").data_type)
                        for w in info["weights"]}
        got = onnx_logits(session(proto), calib[:64])
        assert np.abs(got - torch_logits(q, calib[:64], None)).max() < 1e-5  # the same model at every opset
    assert kinds[13] == {"0": "INT8", "3": "INT8", "7": "INT8", "12": "INT8"}
    assert kinds[21] == {"0": "INT8", "3": "INT8", "7": "INT4", "12": "INT8"}  # 2 bits in an int8 below opset 25
    assert kinds[25] == {"0": "INT8", "3": "INT2", "7": "INT4", "12": "INT8"}
    proto, _ = build_onnx(q, calib[:2], opset=25)
    n7 = q.get_submodule("7").weight.numel()
    assert len(_init(proto, "7_weight_q").raw_data) == n7 // 2  # two 4-bit levels a byte: 1/8 of float32
    assert len(_init(proto, "3_weight_q").raw_data) == q.get_submodule("3").weight.numel() // 4
    assert set(np.unique(onnx.numpy_helper.to_array(_init(proto, "3_weight_q")))) <= {-1, 0, 1}  # 3 symmetric levels


def test_the_graph_takes_raw_images_and_normalizes_them_as_the_dataset_does(digits):
    _, model, ds = digits
    q = quantize(model, 8, 8, ds.calibration_inputs(256, 0))
    norm = Normalization.of_dataset(ds)
    proto, info = build_onnx(q, ds.calibration_inputs(2, 0), normalization=norm)
    assert info["input"] == "image" and proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    proto.graph.output.append(onnx.helper.make_tensor_value_info("normalized", onnx.TensorProto.FLOAT, None))
    sess = session(proto)
    x = ds.x_test[:50]
    normalized = sess.run(["normalized"], {"image": x.numpy()})[0]
    assert np.array_equal(normalized, ds.normalize(x).numpy())  # bit for bit
    with pytest.raises(ExportError, match="raw uint8 images"):
        onnx_logits(sess, ds.normalize(x))


# -- the integer semantics, named: where ONNX and our fake quantizer could differ -----------------
def _one_quantizer_model(bits: int, scale: float, zero_point: float):
    """Identity-weight Linear with an input quantizer: the logits are the quantized input."""
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(4))
    lin.input_quantizer = ActQuantizer(scale, zero_point, 0, 2 ** bits - 1, bits)
    lin.register_forward_pre_hook(_quantize_input_hook)  # as dnq.quant.quantize attaches it
    return nn.Sequential(nn.Flatten(), lin).eval()


def test_rounding_mode_half_to_even_is_the_same_in_both():
    model = _one_quantizer_model(8, 0.5, 10.0)
    ties = torch.tensor([[0.25, 0.75, 1.25, -1.75]])  # x / scale = 0.5, 1.5, 2.5, -3.5: exact ties
    ours = model(ties)
    assert ours.tolist() == [[0.0, 1.0, 1.0, -2.0]]  # half to even: 0, 2, 2, -4 steps
    proto, _ = build_onnx(model, ties)
    assert np.array_equal(onnx_logits(session(proto), ties), ours.detach().numpy())


def test_sub_8_bit_saturation_needs_the_clip_in_an_8_bit_container():
    """``QuantizeLinear`` saturates at its type's range (0..255); a 3-bit quantizer at 0..7. The
    exporter clips to the quantizer's range first; without that clip the runtime keeps levels
    above 7, which our fake quantizer never produces."""
    model = _one_quantizer_model(3, 0.5, 2.0)
    x = torch.tensor([[-5.0, 0.3, 2.4, 40.0]])  # below, inside, at the top and far above the 3-bit range
    ours = model(x).detach().numpy()
    assert ours.tolist() == [[-1.0, 0.5, 2.5, 2.5]]  # levels 0..7 around zero point 2: [-1, 2.5]
    proto, _ = build_onnx(model, x)
    assert np.array_equal(onnx_logits(session(proto), x), ours)
    clip = next(n for n in proto.graph.node if n.op_type == "Clip")
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    q.input[0] = clip.input[0]  # the mutation: no clip
    proto.graph.node.remove(clip)
    assert onnx_logits(session(proto), x)[0, 3] > 2.5  # saturated at level 255, not 7


def test_onnxruntime_defaults_quantize_the_float_bias_and_the_check_turns_that_off():
    """onnxruntime's WeightBiasQuantization rewrites a float bias between quantizers into int32
    at scale s_x * s_w; our fake quantizer keeps it float (and so does the file)."""
    torch.manual_seed(0)
    c1, c2 = nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        c1.weight.fill_(1.0)
        c1.bias.copy_(torch.tensor([0.3, -0.2]))  # at s_x * s_w ~ 1, int32 rounds both to 0
        c2.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
    model = nn.Sequential(c1, c2, nn.Flatten()).eval()
    q = quantize(model, 2, 2, torch.rand(64, 1, 2, 2) * 3, first_last_bits=None, bits_by_layer={"1": (8, 8)})
    x = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 1, 2, 2)
    ours = q(x).detach().numpy()
    proto, _ = build_onnx(q, x)
    exported = onnx_logits(session(proto, quantize_bias=False), x)
    default = onnx_logits(session(proto, quantize_bias=True), x)
    assert np.abs(exported - ours).max() < 1e-6
    s_acc = float(q[0].input_quantizer.scale) * float(q[0].weight_grid.scale[0])
    assert s_acc == pytest.approx(1.0, abs=0.02)
    step = float(q[1].input_quantizer.scale)  # the 8-bit quantizer after the bias
    shift = (default - ours).reshape(2, 4).mean(axis=1)
    assert shift == pytest.approx([-0.3, 0.2], abs=step)  # the biases dropped to round(b / s_acc) = 0


# -- every PTQ method leaves its weights on the grid it records -----------------------------------
@pytest.mark.parametrize("convention", ["dnq", "paper"])
def test_every_method_records_the_grid_its_weights_lie_on(convention):
    torch.manual_seed(0)
    model = CifarResNet(8, 10, 1).eval()  # three residual blocks, two with shortcut convolutions
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # a negative BatchNorm scale mirrors the grid when folded (rtn+bn)
            m.weight.data.uniform_(-1.5, 1.5)
            m.running_var.uniform_(0.5, 2.0)
    calib = torch.randn(64, 1, 8, 8)
    for method in ("rtn", "rtn+bn", "adaround", "brecq", "qdrop"):
        q = apply_ptq(model, method, 3, 4, calib, convention=convention, iters=3)
        for name, layer in q.named_modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                g = layer.weight_grid
                levels = g.levels(layer.weight)
                assert g.qmin <= int(levels.min()) and int(levels.max()) <= g.qmax, (method, name)
                assert torch.equal(g.dequantized(layer.weight), layer.weight.detach()), (method, name)
                assert (g.qmin, g.qmax) == ((0, 7) if convention == "paper" else (-3, 3)) or g.bits == 8


def test_weight_grid_folding_by_hand():
    g = WeightGrid(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 2.0]), 0, 3, 2)
    w = torch.tensor([[-0.5, 0.0, 1.0], [-1.0, 0.5, 0.0]])  # levels [0, 1, 3], [0, 3, 2]
    assert g.levels(w).tolist() == [[0, 1, 3], [0, 3, 2]]
    f = torch.tensor([2.0, -4.0])
    h = g.folded(f)
    assert h.scale.tolist() == [1.0, 2.0] and h.zero_point.tolist() == [1.0, 1.0]  # 0 + 3 - 2
    assert h.levels(w * f.view(-1, 1)).tolist() == [[0, 1, 3], [3, 0, 1]]  # mirrored: q -> 3 - q
    assert torch.equal(h.dequantized(w * f.view(-1, 1)), w * f.view(-1, 1))


# -- other models: the residual blocks, ReLU6, the torchvision blocks ---------------------------
@pytest.mark.parametrize("arch", ["resnet20", "resnet18", "mobilenetv2"])
@pytest.mark.parametrize("convention", ["dnq", "paper"])
def test_zoo_models_export_and_run(arch, convention):
    torch.manual_seed(0)
    model = build_model(arch, 10, 1, 8).eval()
    for m in model.modules():  # trained-like BatchNorm statistics (the initial ones leave 8x8 inputs near zero)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    calib = torch.randn(32, 1, 8, 8)
    float_proto, _ = build_onnx(model, calib[:2])  # a float model: the graph translation alone
    x = torch.randn(16, 1, 8, 8)
    assert np.abs(onnx_logits(session(float_proto), x) - torch_logits(model, x, None)).max() < 1e-4
    q = apply_ptq(model, "rtn+bn", 4, 4, calib, convention=convention)
    proto, info = build_onnx(q, calib[:2])
    onnx.checker.check_model(proto, full_check=True)
    got, ref = onnx_logits(session(proto), x), torch_logits(q, x, None)
    # untrained weights amplify the rare neighbouring-level flips of the accumulation order (one element in
    # 10^4 at mobilenetv2's third quantizer, a few percent by its last); trained models: the digits grid above
    assert np.abs(got - ref).mean() < 0.05 * np.abs(ref).max()
    assert len(info["weights"]) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in q.modules())


def test_a_model_quantized_on_the_device_exports_the_same(device, digits):
    _, model, ds = digits
    calib = ds.calibration_inputs(256, 0)
    q = apply_ptq(model.to(device), "rtn+bn", 4, 4, calib.to(device))
    model.cpu()
    norm = Normalization.of_dataset(ds)
    proto, _ = build_onnx(q, calib[:2].to(device), normalization=norm)
    r = round_trip(q, proto, ds.x_test, ds.y_test, norm)  # ours on the device, onnxruntime on the CPU
    assert r["agreement"] >= 0.995 and abs(r["acc_diff"]) <= 0.1


# -- refusals: one line, nothing written --------------------------------------------------------
def test_unsupported_layers_and_hooks_are_refused_before_writing(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    vit = apply_ptq(build_model("vit-tiny", 10, 3, 32).eval(), "rtn", 4, 4, torch.randn(8, 3, 32, 32))
    with pytest.raises(ExportError, match=r"LayerNorm.*no ONNX translation"):
        to_onnx(vit, torch.randn(2, 3, 32, 32), path)
    gelu = quantize(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)).eval(), 8, 8, torch.randn(16, 4))
    with pytest.raises(ExportError, match=r"'1' \(GELU\)"):
        to_onnx(gelu, torch.randn(2, 4), path)
    hooked = quantize(nn.Sequential(nn.Linear(4, 2)).eval(), 8, 8, torch.randn(16, 4))
    hooked[0].register_forward_hook(lambda m, a, o: o * 2)
    with pytest.raises(ExportError, match="forward hook the exporter does not know"):
        to_onnx(hooked, torch.randn(2, 4), path)
    with pytest.raises(ExportError, match="opset must be"):
        to_onnx(hooked, torch.randn(2, 4), path, opset=11)
    assert not path.exists() and not list(tmp_path.iterdir())
    path.write_bytes(b"user data")
    ok = quantize(nn.Sequential(nn.Linear(4, 2)).eval(), 8, 8, torch.randn(16, 4))
    with pytest.raises(ExportError, match="exists"):
        to_onnx(ok, torch.randn(2, 4), path)
    assert path.read_bytes() == b"user data"


def test_a_weight_changed_after_ptq_is_refused():
    torch.manual_seed(0)
    q = quantize(nn.Sequential(nn.Linear(4, 2)).eval(), 4, 8, torch.randn(16, 4), first_last_bits=None)
    with torch.no_grad():
        q[0].weight.add_(1e-3)
    with pytest.raises(ExportError, match="not on its recorded 4-bit grid"):
        build_onnx(q, torch.randn(2, 4))


# -- the command ----------------------------------------------------------------------------------
def _dnq(capsys, *args) -> tuple[int, str, str]:
    from dnq.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dnq_export_writes_the_model_and_its_sidecar_and_checks_it(digits, tmp_path, capsys):
    from dnq.sensitivity_file import model_hash

    run, model, ds = digits
    out = tmp_path / "digits-w4a4.onnx"
    code, stdout, _ = _dnq(capsys, "export", run, "--bits", "W4A4", "--method", "rtn+bn", "--out", out, "--check",
                           "--quiet", "--device", "cpu")
    assert code == 0 and "as exported" in stdout and "-> passed" in stdout and f"wrote {out}" in stdout
    side = json.loads(sidecar_path(out).read_text())
    assert side["written_by"] == "dnq export" and side["source"]["model_hash"] == model_hash(model)
    assert side["ptq"]["method"] == "rtn+bn" and side["ptq"]["convention"] == "dnq" and side["ptq"]["bits"] == "W4A4"
    assert [(w["layer"], w["bits"], w["container"]) for w in side["layers"]] == [
        ("0", 8, "INT8"), ("3", 4, "INT4"), ("7", 4, "INT4"), ("12", 8, "INT8")]
    assert side["size"]["weights_by_bits"]["4"]["ratio_to_float32"] == 0.125
    assert side["size"]["onnx_bytes"] == os.path.getsize(out) < side["size"]["float_onnx_bytes"] / 4
    c = side["check"]["exported"]
    assert c["passed"] and c["acc_ours"] == pytest.approx(side["accuracy"]["test_acc"])
    assert {m.key: m.value for m in onnx.load(out).metadata_props}["dnq.method"] == "rtn+bn"
    before = out.read_bytes()
    code, _, err = _dnq(capsys, "export", run, "--bits", "W2A4", "--out", out, "--quiet")
    assert code == 2 and "--overwrite" in err and out.read_bytes() == before
    assert _dnq(capsys, "export", run, "--bits", "W2A4", "--out", out, "--quiet", "--overwrite")[0] == 0
    assert json.loads(sidecar_path(out).read_text())["ptq"]["bits"] == "W2A4"


def test_dnq_export_of_a_mixed_allocation(digits, tmp_path):
    from landscape.sensitivity_run import run_sensitivity

    run, _, _ = digits
    sens = tmp_path / "sensitivity.json"
    run_sensitivity(run, bits=[2, 4, 8], samples=128, matvecs=4, out=sens, quiet=True, device="cpu")
    side = export_run(run, tmp_path / "mixed.onnx", mixed="avg-bits=4", objective="predicted", sensitivity=sens,
                      check=True, quiet=True, device="cpu")
    alloc = side["ptq"]["mixed"]
    assert side["ptq"]["bits"] == "avg-bits=4:predicted" and alloc["avg_bits"] <= 4
    bits = {w["layer"]: w["bits"] for w in side["layers"]}
    assert bits["0"] == bits["12"] == 8 and {bits["3"], bits["7"]} <= {2, 4, 8}
    assert {k: bits[k] for k in alloc["bits"]} == {k: (v if isinstance(v, int) else v[0]) for k, v in
                                                    alloc["bits"].items()}
    containers = {w["layer"]: w["container"] for w in side["layers"]}
    assert all(containers[k] == {2: "INT8", 4: "INT4", 8: "INT8"}[b] for k, b in bits.items())
    assert side["check"]["passed"] and side["check"]["exported"]["agreement"] >= 0.995


def test_export_settings_are_refused_in_one_line(digits, tmp_path, capsys):
    run, _, _ = digits
    for args, msg in [(("--bits", "W4A4,W2A4"), "one export is one bit setting"), ((), "give the bits"),
                      (("--bits", "W4A4", "--mixed", "avg-bits=3"), "drop --bits"),
                      (("--mixed", "avg-bits=3", "--convention", "paper"), "use --convention dnq"),
                      (("--bits", "W4A4", "--opset", "12"), "opset must be an integer in 13..25")]:
        code, _, err = _dnq(capsys, "export", run, *args, "--out", tmp_path / "x.onnx", "--quiet")
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (args, err)
    (tmp_path / "mine.onnx").write_bytes(b"not ours")
    code, _, err = _dnq(capsys, "export", run, "--bits", "W4A4", "--out", tmp_path / "mine.onnx", "--overwrite")
    assert code == 2 and "not written by dnq export" in err
    assert (tmp_path / "mine.onnx").read_bytes() == b"not ours" and sorted(os.listdir(tmp_path)) == ["mine.onnx"]


def test_the_real_command_line(digits, tmp_path):
    r = run_dnq("export", digits[0], "--bits", "W8A8", "--out", tmp_path / "m.onnx", "--quiet", "--device", "cpu")
    assert "exported cnn-digits" in r.stdout and (tmp_path / "m.onnx.json").exists()


def test_a_fake_quantizer_round_trip_of_the_reference_formula():
    """The scalar formula both sides implement, on a grid of values: QuantizeLinear then
    DequantizeLinear equals ``fake_quantize`` for every 8-bit zero point."""
    x = torch.linspace(-3, 3, 600)
    for zp in (0, 7, 128, 255):
        model = _one_quantizer_model(8, 0.0125, float(zp))
        xs = x.view(-1, 4)
        proto, _ = build_onnx(model, xs)
        ref = fake_quantize(xs, torch.tensor(0.0125), torch.tensor(float(zp)), 0, 255)
        assert np.array_equal(onnx_logits(session(proto), xs), ref.numpy())
