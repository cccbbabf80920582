"""CIFAR ResNets.

``resnet20`` / ``resnet56``: He et al. 2016, section 4.2 (3 stages of 16/32/64 channels, 6n+2
layers); the shortcut across a stride-2 block is a 1x1 convolution with BatchNorm (option B), so
that every shortcut is a Conv layer the quantizer sees.
``resnet18``: torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool).

Example:
    >>> import torch, torch.nn as nn
    >>> from dnq.models.resnet import resnet20, resnet56
    >>> for build in (resnet20, resnet56):  # depth 6n+2: 3x3 convolutions + the classifier; ~0.27M / 0.85M weights
    ...     model = build()
    ...     print(sum(m.kernel_size == (3, 3) for m in model.modules() if isinstance(m, nn.Conv2d)) + 1,
    ...           round(sum(p.numel() for p in model.parameters()) / 1e6, 2))
    20 0.27
    56 0.86
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

import torch.nn as nn
import torch.nn.functional as F
import torchvision


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet20(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return CifarResNet(20, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return CifarResNet(56, num_classes, in_channels)


def resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model
