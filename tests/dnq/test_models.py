import pytest
import torch

from dnq.models import MODELS, build_model


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_builds_and_runs(name):
    small = name.endswith("digits")
    c, s = (1, 8) if small else (3, 32)
    model = build_model(name, num_classes=7, in_channels=c, image_size=s)
    out = model(torch.randn(2, c, s, s))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError) as e:
        build_model("resnet50")
    assert all(n in str(e.value) for n in MODELS)


def test_cnn_digits_size():
    # conv 1->16, 16->32, 32->32 (3x3, no bias), three BatchNorms, linear 32->10
    expected = 1 * 16 * 9 + 16 * 32 * 9 + 32 * 32 * 9 + 2 * (16 + 32 + 32) + 32 * 10 + 10
    assert sum(p.numel() for p in build_model("cnn-digits", 10, 1, 8).parameters()) == expected


def test_vit_linear_layers_are_visible_to_hooks():
    model = build_model("vit-tiny", 10, 3, 32)
    called = set()
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(lambda mod, a, n=n: called.add(n))
    model(torch.randn(1, 3, 32, 32))
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert called == linears and "blocks.0.attn.proj" in called
    assert model.patch.kernel_size == (4, 4)


def test_cifar_stems_keep_resolution():
    r18 = build_model("resnet18", 100, 3, 32)
    assert r18.conv1.stride == (1, 1) and isinstance(r18.maxpool, torch.nn.Identity)
    mb = build_model("mobilenetv2", 100, 3, 32)
    assert mb.features[0][0].stride == (1, 1)
    feats = mb.features(torch.randn(1, 3, 32, 32))
    assert feats.shape[-1] == 4
