"""Users' own architectures of the kinds the zoo does not have, for the custom-model paths.

Named on the command line and in ONNX metadata as `tests.support.user_models:<factory>` (the
repository root is on sys.path under pytest). Each factory takes the keyword arguments
`in_shape` and `num_classes` that `pqsu.export.custom.custom_model` passes when a factory
accepts them, so one factory serves Fashion-MNIST (1, 28, 28) and sensor windows alike.
Widths are tiny on purpose: every model goes through export, the bridge and a fine-tune
step inside the default test suite's time budget.

- `mobilenet_net`: depthwise-separable convs (groups == channels) with BatchNorm2d;
- `groupnorm_resnet`: a residual block normalized by GroupNorm (exported as anonymous tensors);
- `attribute_bn_net`: BatchNorm held as attributes (`self.bn1`), torchvision style, with a skip;
- `conv1d_net`: Conv1d + BatchNorm1d for (channels, length) sensor windows;
- `layernorm_mlp`: Linear layers and LayerNorm only;
- `prenorm_net`: a BatchNorm before any conv, which cannot be folded: a bad-input case.
"""
from __future__ import annotations

import math

import torch
from torch import nn

IMAGE = (1, 28, 28)
WINDOW = (1, 24)  # ItalyPowerDemand: one smart meter's 24 hourly readings


class MobileNetStyle(nn.Module):
    def __init__(self, in_shape=IMAGE, num_classes=10):
        super().__init__()

        def separable(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                    nn.ReLU6(), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()]

        self.features = nn.Sequential(nn.Conv2d(in_shape[0], 8, 3, stride=2, padding=1, bias=False),
                                      nn.BatchNorm2d(8), nn.ReLU6(), *separable(8, 16, 1), *separable(16, 24, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class GroupNormResNet(nn.Module):
    def __init__(self, in_shape=IMAGE, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_shape[0], 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn2 = nn.GroupNorm(4, 8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.gn2(self.conv2(torch.relu(self.gn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.pool(torch.relu(x + y)), 1))


class AttributeBatchNormNet(nn.Module):
    """torchvision's layout: conv and BatchNorm are attributes, wired only in `forward`."""

    def __init__(self, in_shape=IMAGE, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_shape[0], 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(12)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(x + self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Conv1dNet(nn.Module):
    def __init__(self, in_shape=WINDOW, num_classes=2):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(in_shape[0], 8, 5, padding=2, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                                      nn.MaxPool1d(2), nn.Conv1d(8, 12, 3, padding=1, bias=False), nn.BatchNorm1d(12),
                                      nn.ReLU(), nn.AdaptiveAvgPool1d(1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class LayerNormMLP(nn.Module):
    def __init__(self, in_shape=WINDOW, num_classes=2):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), 32), nn.LayerNorm(32), nn.ReLU(),
                                  nn.Linear(32, 16), nn.LayerNorm(16), nn.ReLU())
        self.out = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


class PreNormNet(nn.Module):
    """A BatchNorm on the input, before any conv: nothing to fold it into, so export must refuse it."""

    def __init__(self, in_shape=IMAGE, num_classes=10):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_shape[0])
        self.conv = nn.Conv2d(in_shape[0], 4, 3, padding=1)
        self.fc = nn.Linear(4 * in_shape[1] * in_shape[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(self.bn(x))), 1))


def mobilenet_net(in_shape=IMAGE, num_classes=10) -> nn.Module:
    return MobileNetStyle(tuple(in_shape), num_classes)


def groupnorm_resnet(in_shape=IMAGE, num_classes=10) -> nn.Module:
    return GroupNormResNet(tuple(in_shape), num_classes)


def attribute_bn_net(in_shape=IMAGE, num_classes=10) -> nn.Module:
    return AttributeBatchNormNet(tuple(in_shape), num_classes)


def conv1d_net(in_shape=WINDOW, num_classes=2) -> nn.Module:
    return Conv1dNet(tuple(in_shape), num_classes)


def layernorm_mlp(in_shape=WINDOW, num_classes=2) -> nn.Module:
    return LayerNormMLP(tuple(in_shape), num_classes)


def prenorm_net(in_shape=IMAGE, num_classes=10) -> nn.Module:
    return PreNormNet(tuple(in_shape), num_classes)


IMAGE_FACTORIES = ("mobilenet_net", "groupnorm_resnet", "attribute_bn_net")
SENSOR_FACTORIES = ("conv1d_net", "layernorm_mlp")
