"""MobileNetV2 for 32x32 inputs: torchvision's model with a stride-1 stem and the second
stage at stride 1 (as in the common CIFAR variant), so the last feature map is 4x4."""

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
