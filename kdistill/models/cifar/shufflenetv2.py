"""ShuffleNetV2 (Ma et al. 2018) at 1x, as RepDistiller's models/ShuffleNetv2.py builds `ShuffleV2`
for CIFAR: a 1x1 stem without stride, three stages (116, 232, 464 channels; 3, 7, 3 blocks after a
stride-2 down block), a 1x1 conv to 1024 channels, global average pooling, one linear layer.

Module paths: `conv1`, `bn1`, `layer1`..`layer3`, `conv2`, `bn2`, `pool`, `linear`.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.models.registry import register_model

STAGES = ((116, 3), (232, 7), (464, 3))


def _shuffle(x: Tensor, groups: int = 2) -> Tensor:
    """Interleave the channels of `groups` halves, so information crosses between the split branches."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)


class BasicBlock(nn.Module):
    """Half the channels pass through; the other half go 1x1 - depthwise 3x3 - 1x1; then shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1, self.bn1 = _conv(half, half, 1), nn.BatchNorm2d(half)
        self.conv2, self.bn2 = _conv(half, half, 3, groups=half), nn.BatchNorm2d(half)
        self.conv3, self.bn3 = _conv(half, half, 1), nn.BatchNorm2d(half)

    def forward(self, x: Tensor) -> Tensor:
        kept, x = x.chunk(2, dim=1)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(x)))))
        return _shuffle(torch.cat([kept, x], 1))


class DownBlock(nn.Module):
    """Two stride-2 branches of out_channels / 2 each, concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1, self.bn1 = _conv(in_channels, in_channels, 3, 2, groups=in_channels), nn.BatchNorm2d(in_channels)
        self.conv2, self.bn2 = _conv(in_channels, mid, 1), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = _conv(in_channels, mid, 1), nn.BatchNorm2d(mid)
        self.conv4, self.bn4 = _conv(mid, mid, 3, 2, groups=mid), nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = _conv(mid, mid, 1), nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return _shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.conv1, self.bn1 = _conv(in_channels, 24, 1), nn.BatchNorm2d(24)
        channels = 24
        for i, (width, blocks) in enumerate(STAGES, start=1):
            setattr(self, f"layer{i}", nn.Sequential(DownBlock(channels, width),
                                                     *(BasicBlock(width) for _ in range(blocks))))
            channels = width
        self.conv2, self.bn2 = _conv(channels, 1024, 1), nn.BatchNorm2d(1024)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(1024, num_classes)  # PyTorch's default initialisation, as in the official code

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(self.pool(x).flatten(1))


@register_model("shufflenetv2", "ShuffleNetV2 1x for CIFAR (RepDistiller's ShuffleV2), 1.36M params on CIFAR-100")
def shufflenetv2(input_shape: tuple[int, int, int], num_classes: int) -> ShuffleNetV2:
    return ShuffleNetV2(input_shape[0], num_classes)
