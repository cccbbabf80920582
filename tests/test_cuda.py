"""CUDA paths (run by scripts/gpu_check.sh on a GPU machine; skipped, with the reason shown, elsewhere)."""

import json

import pytest
import torch

from dnq.data import load_dataset, random_crop_flip
from dnq.models import build_model
from dnq.noise import QuantNoise
from dnq.quant import quantize
from dnq.train import TrainConfig, train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_dnq_trains_on_cuda_with_bf16_and_channels_last(tmp_path):
    out = tmp_path / "run"
    res = train(TrainConfig(data="synthetic:10:2048", model="resnet20", method="dnq", epochs=2, batch_size=256,
                            out=str(out), swa_start=0.5), quiet=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved_device"].startswith("cuda") and res["test_loss"] == res["test_loss"]
    blob = torch.load(out / "model.pt", weights_only=True)
    assert all(v.device.type == "cpu" for v in blob["model"].values())


def test_sam_and_gaussian_step_on_cuda(tmp_path):
    for method in ("sam", "gaussian", "dnq-a"):
        res = train(TrainConfig(data="digits", model="cnn-digits", method=method, epochs=2, out=str(tmp_path / method)),
                    quiet=True)
        assert res["test_acc"] > 0.2


def test_quantize_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, 32).eval()
    x = torch.randn(64, 3, 32, 32)
    q_cpu = quantize(model, 4, 4, x)
    q_gpu = quantize(model.cuda(), 4, 4, x.cuda())
    torch.testing.assert_close(q_gpu(x.cuda()).cpu(), q_cpu(x), rtol=1e-3, atol=1e-3)


def test_augmentation_runs_on_the_gpu():
    ds = load_dataset("synthetic:10:64").to("cuda")
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
    b.update(calib.cuda())
    for n in a.w_var:
        torch.testing.assert_close(b.w_var[n].cpu(), a.w_var[n], rtol=1e-4, atol=1e-9)
    for n in a.a_var:
        assert abs(b.a_var[n] - a.a_var[n]) <= 1e-4 * a.a_var[n] + 1e-9
