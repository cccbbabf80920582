"""CUDA paths (run by scripts/gpu_check.sh on a GPU machine; skipped, with the reason shown, elsewhere).

Honest comparisons: TF32 is off in every test (a Hopper GPU would otherwise run float32
convolutions at ~1e-3 relative precision); quantizers are compared by their ranges and
quantized weights, and quantized predictions by argmax agreement, never 4-bit logits at a
tight tolerance (rounding flips on 1e-6 input differences)."""

import json

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from dnq.data import BatchLoader, load_dataset, random_crop_flip
from dnq.methods import METHODS, make_method
from dnq.models import build_model
from dnq.noise import QuantNoise
from dnq.quant import quantize
from dnq.train import TrainConfig, make_autocast, train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_dnq_trains_on_cuda_with_bf16_and_channels_last(tmp_path):
    out = tmp_path / "run"
    res = train(TrainConfig(data="synthetic:10:2048", model="resnet20", method="dnq", epochs=2, batch_size=256,
                            out=str(out), swa_start=0.5), quiet=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved_device"].startswith("cuda") and cfg["amp"] is True and cfg["channels_last"] is True
    assert res["test_loss"] == res["test_loss"]
    blob = torch.load(out / "model.pt", weights_only=True)
    assert all(v.device.type == "cpu" for v in blob["model"].values())


@pytest.mark.parametrize("method", METHODS)
def test_every_method_learns_digits_on_cuda(tmp_path, method):
    res = train(TrainConfig(data="digits", model="cnn-digits", method=method, epochs=3, out=str(tmp_path / method)),
                quiet=True)
    assert res["test_acc"] > 0.5


@pytest.mark.parametrize("model_name", ["resnet20", "vit-tiny"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_steps_on_cuda_without_a_host_sync(model_name, method):
    """bf16 autocast + channels_last on the GPU; after the first (planning) step, a step makes no
    device-to-host synchronization (``torch.cuda.set_sync_debug_mode("error")`` raises on one),
    and a fixed batch's clean loss falls."""
    torch.manual_seed(0)
    model = build_model(model_name, 10, 3, 32).to(CUDA).to(memory_format=torch.channels_last).train()
    ds = load_dataset("synthetic:10:64:32").to(CUDA)
    loader = BatchLoader(ds, 16, True, seed=0, channels_last=True)
    calib = ds.calibration_inputs(32).contiguous(memory_format=torch.channels_last)
    m = make_method(method, 4, 4)
    m.setup(model, calib, CUDA, 0, 0)
    m.on_epoch_start(0, 1.0)
    lr = 0.02 if model_name == "resnet20" else 0.003
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    crit, autocast = nn.CrossEntropyLoss(), make_autocast(CUDA, True)
    x, y = next(iter(loader))

    def clean_loss():
        if m.uses_noise:
            lam, m.noise.act_lambda = m.noise.act_lambda, 0.0
        with torch.no_grad(), autocast():
            v = float(nn.functional.cross_entropy(model(x).float(), y))
        if m.uses_noise:
            m.noise.act_lambda = lam
        return v

    before = clean_loss()
    losses = torch.zeros(8, device=CUDA)
    for i in range(8):
        opt.zero_grad(set_to_none=True)
        if i == 0:
            loss, _ = m.step(model, x, y, crit, autocast)
        else:
            torch.cuda.set_sync_debug_mode("error")
            try:
                loss, _ = m.step(model, x, y, crit, autocast)
                losses[i] = loss
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            continue
        losses[i] = loss
        opt.step()
    assert torch.isfinite(losses).all()
    assert clean_loss() < before
    if m.uses_noise:
        assert all(torch.isfinite(v).all() for v in m.noise.w_var.values())
        assert all(v == v for v in m.noise.a_var.values())


@pytest.mark.parametrize("method", ["dnq"])  # sgd and sam: tests/test_gpu_paths.py (aot_eager, CPU)
def test_inductor_compiled_step_on_cuda_has_no_graph_break(method):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32).to(CUDA).to(memory_format=torch.channels_last).train()
    x = torch.randn(64, 3, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,), device=CUDA)
    m = make_method(method, 4, 4)
    m.setup(model, x, CUDA, 0, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    net = torch.compile(model)
    for epoch, lam in ((0, 0.5), (1, 1.0)):
        m.on_epoch_start(epoch, lam)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            m.step(net, x, y, nn.CrossEntropyLoss(), make_autocast(CUDA, True))
            opt.step()
    torch.cuda.synchronize()
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]


def test_quantizers_on_cuda_match_the_cpu():
    """Same ranges and quantized weights (up to float rounding of the scales), and the quantized
    models agree on >= 99% of the predictions."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32).eval()
    calib, x = torch.randn(64, 3, 32, 32), torch.randn(512, 3, 32, 32)
    q_cpu = quantize(model, 4, 4, calib)
    q_gpu = quantize(model.to(CUDA), 4, 4, calib.to(CUDA))
    for a, b in zip(q_cpu.ptq_layers, q_gpu.ptq_layers):
        assert a["layer"] == b["layer"] and (a["wbits"], a["abits"]) == (b["wbits"], b["abits"])
        assert b["act_lo"] == pytest.approx(a["act_lo"], rel=1e-5, abs=1e-6)
        assert b["act_hi"] == pytest.approx(a["act_hi"], rel=1e-5, abs=1e-6)
    for (n, wa), (_, wb) in zip(q_cpu.named_parameters(), q_gpu.named_parameters()):
        if n.endswith("weight") and wa.dim() > 1:
            diff = (wb.cpu() - wa).abs()
            step = wa.abs().amax(dim=tuple(range(1, wa.dim())), keepdim=True) / 7  # one 4-bit step
            assert float((diff > 1e-4 * step).float().mean()) < 1e-3, n  # grids agree (rare tie flips allowed)
    with torch.no_grad():
        agree = (q_gpu(x.to(CUDA)).argmax(1).cpu() == q_cpu(x).argmax(1)).float().mean()
    assert float(agree) >= 0.99


def test_augmentation_runs_on_the_gpu():
    ds = load_dataset("synthetic:10:64").to(CUDA)
    g = torch.Generator(device="cuda").manual_seed(0)
    out = random_crop_flip(ds.x_train, g)
    assert out.device.type == "cuda" and out.shape == ds.x_train.shape and out.dtype == torch.uint8


def test_noise_statistics_on_cuda_match_cpu():
    torch.manual_seed(0)
    model = build_model("cnn-digits", 10, 1, 8)
    calib = torch.randn(64, 1, 8, 8)
    a = QuantNoise(model, 4, 4)
    a.update(calib)
    b = QuantNoise(model.cuda(), 4, 4)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the statistics ignore an outer autocast
        b.update(calib.cuda())
    for n in a.w_var:
        torch.testing.assert_close(b.w_var[n].cpu(), a.w_var[n], rtol=1e-4, atol=1e-9)
    for n in a.a_var:
        assert abs(b.a_var[n] - a.a_var[n]) <= 1e-4 * a.a_var[n] + 1e-9


def test_reconstruction_on_cuda_streams_its_cache_and_matches_the_cpu_ranges():
    """QDrop on CUDA: the cache kept on the device and streamed from pinned host memory give the
    same quantized model; the initial step sizes equal the CPU's (same float model, same images)."""
    import warnings

    from dnq.recon import reconstruct

    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32).eval()
    x = torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = reconstruct(model.to(CUDA), 4, 4, x.to(CUDA), "qdrop", iters=10, batch_size=16)
        streamed = reconstruct(model.to(CUDA), 4, 4, x.to(CUDA), "qdrop", iters=10, batch_size=16, device_budget=0)
    assert all(u["streamed"] == [] for u in full.ptq_recon["units"])
    assert all(set(u["streamed"]) == {"qx", "fy"} for u in streamed.ptq_recon["units"])
    assert all(torch.equal(v, streamed.state_dict()[k]) for k, v in full.state_dict().items())
    cpu = reconstruct(model.cpu(), 4, 4, x, "qdrop", iters=1, batch_size=16, act_lr=0.0, weight_lr=0.0)
    gpu = reconstruct(model.to(CUDA), 4, 4, x.to(CUDA), "qdrop", iters=1, batch_size=16, act_lr=0.0, weight_lr=0.0)
    for a, b in zip(cpu.ptq_layers, gpu.ptq_layers):
        assert a["act_scale"] == pytest.approx(b["act_scale"], rel=1e-4)
