"""Model registry.

Example:
    >>> from dnq.models import build_model
    >>> model = build_model("cnn-digits", num_classes=10, in_channels=1, image_size=8)
    >>> sum(p.numel() for p in model.parameters())
    14458
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .cnn import CNNDigits, MLPDigits
from .mobilenet import mobilenetv2
from .resnet import resnet18, resnet20, resnet56
from .vit import vit_tiny

MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn-digits": CNNDigits,
    "mlp-digits": MLPDigits,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet18": resnet18,
    "mobilenetv2": mobilenetv2,
    "vit-tiny": vit_tiny,
}


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :data:`MODELS`.
        num_classes: size of the classifier output.
        in_channels: input image channels.
        image_size: input height and width (the ViT needs it; CNNs pool globally).

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)


__all__ = ["MODELS", "build_model"]
