"""MobileNetV2 for 32x32 inputs: torchvision's model with a stride-1 stem and the second
stage at stride 1 (as in the common CIFAR variant), so the last feature map is 4x4.

Example:
    >>> import torch
    >>> from dnq.models.mobilenet import mobilenetv2
    >>> model, x = mobilenetv2(num_classes=10), torch.zeros(2, 3, 32, 32)
    >>> model.features(x).shape[-2:], model(x).shape
    (torch.Size([4, 4]), torch.Size([2, 10]))
"""

import torch.nn as nn
import torchvision

CIFAR_SETTING = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
                 [6, 320, 1, 1]]


def mobilenetv2(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    model = torchvision.models.mobilenet_v2(num_classes=num_classes, inverted_residual_setting=CIFAR_SETTING)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    return model
