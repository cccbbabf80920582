"""Small models for the 8x8 digits data.

Example:
    >>> import torch
    >>> from dnq.models.cnn import CNNDigits, MLPDigits
    >>> x = torch.zeros(5, 1, 8, 8)  # five 8x8 grey images
    >>> CNNDigits()(x).shape, MLPDigits()(x).shape  # 10 logits each
    (torch.Size([5, 10]), torch.Size([5, 10]))
    >>> CNNDigits()(torch.zeros(5, 1, 28, 28)).shape  # the CNN pools globally: any input size
    torch.Size([5, 10])
"""

import torch.nn as nn


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CNNDigits(nn.Sequential):
    """Three 3x3 conv + BatchNorm + ReLU layers, a max-pool, global average pool, linear head.

    14,458 parameters for 1-channel inputs and 10 classes; any input size works.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8):
        super().__init__(
            *_conv_bn(in_channels, 16), *_conv_bn(16, 32), nn.MaxPool2d(2), *_conv_bn(32, 32),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
        )


class MLPDigits(nn.Sequential):
    """A two-layer perceptron without normalization layers (used where exact DDP parity is tested)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, hidden: int = 64):
        super().__init__(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))
