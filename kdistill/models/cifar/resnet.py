"""CIFAR ResNets (He et al. 2016, section 4.2) as RepDistiller's models/resnet.py builds them.

Three stages of 6n+2 layers' basic blocks after a 3x3 stem; `resnet20`/`resnet56` use widths
16-16-32-64, the "x4" models 32-64-128-256. Module paths: `conv1`, `bn1`, `layer1`..`layer3`
(blocks inside: `layer2.0.conv1`), `pool`, `fc`.
"""

import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.models.cifar.common import conv_bn
from kdistill.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, out_channels, 3, stride)
        self.conv2, self.bn2 = conv_bn(out_channels, out_channels, 3)
        # A 1x1 projection when the shape changes (RepDistiller's `downsample`), else the identity.
        self.downsample = nn.Sequential(*conv_bn(in_channels, out_channels, 1, stride)) \
            if stride != 1 or in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class CifarResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, depth: int, widths: tuple[int, int, int, int]):
        super().__init__()
        blocks = (depth - 2) // 6
        self.conv1, self.bn1 = conv_bn(in_channels, widths[0], 3)
        channels = widths[0]
        for i, (width, stride) in enumerate(zip(widths[1:], (1, 2, 2), strict=True), start=1):
            layer = []
            for b in range(blocks):
                layer.append(BasicBlock(channels, width, stride if b == 0 else 1))
                channels = width
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def _register(name: str, depth: int, widths: tuple[int, int, int, int], description: str) -> None:
    @register_model(name, description)
    def build(input_shape: tuple[int, int, int], num_classes: int) -> CifarResNet:
        return CifarResNet(input_shape[0], num_classes, depth, widths)


_register("resnet20", 20, (16, 16, 32, 64), "CIFAR ResNet-20 (RepDistiller), 0.28M params on CIFAR-100")
_register("resnet56", 56, (16, 16, 32, 64), "CIFAR ResNet-56 (RepDistiller), 0.86M params on CIFAR-100: a teacher")
_register("resnet8x4", 8, (32, 64, 128, 256),
          "ResNet-8x4 (RepDistiller), 1.23M params on CIFAR-100: the standard KD student")
_register("resnet32x4", 32, (32, 64, 128, 256),
          "ResNet-32x4 (RepDistiller), 7.43M params on CIFAR-100: the standard KD teacher")
