"""Wide ResNets (Zagoruyko and Komodakis 2016) as RepDistiller's models/wrn.py builds them.

Pre-activation blocks (BN-ReLU-conv), depth 6n+4, widths 16-16k-32k-64k. Module paths:
`conv1`, `block1`..`block3` (blocks inside: `block2.layer.0.conv1`), `bn1`, `pool`, `fc`.
The names, `layer` and `convShortcut` included, are the official ones: RepDistiller's
published wrn_40_2 teacher loads unchanged.
"""

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.models.args import probability
from kdistill.models.cifar.common import init_like_repdistiller
from kdistill.models.registry import register_model


class PreActBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.dropout = dropout
        # A 1x1 projection when the width changes (named as in the official code, for its checkpoints).
        self.convShortcut = None if in_channels == out_channels else \
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        # When the shape changes, the shortcut also starts from the activated input (as in the official code).
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        out = F.relu(self.bn2(self.conv1(activated)))
        out = F.dropout(out, p=self.dropout, training=self.training)
        return shortcut + self.conv2(out)


class WideResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, depth: int, widen: int, dropout: float = 0.0):
        super().__init__()
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        channels = widths[0]
        for i, (width, stride) in enumerate(zip(widths[1:], (1, 2, 2), strict=True), start=1):
            layer = []
            for b in range(blocks):
                layer.append(PreActBlock(channels, width, stride if b == 0 else 1, dropout))
                channels = width
            # The official NetworkBlock holds its blocks in `.layer`: keep that level for its state-dict keys.
            setattr(self, f"block{i}", nn.Sequential(OrderedDict(layer=nn.Sequential(*layer))))
        self.bn1 = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_like_repdistiller(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.pool(F.relu(self.bn1(x))).flatten(1))


@register_model("wrn_16_2", "Wide ResNet 16-2 (RepDistiller), 0.70M params on CIFAR-100: a KD student")
def wrn_16_2(input_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.0) -> WideResNet:
    return WideResNet(input_shape[0], num_classes, 16, 2, probability("wrn_16_2", "dropout", dropout))


@register_model("wrn_40_2", "Wide ResNet 40-2 (RepDistiller), 2.26M params on CIFAR-100: a KD teacher")
def wrn_40_2(input_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.0) -> WideResNet:
    return WideResNet(input_shape[0], num_classes, 40, 2, probability("wrn_40_2", "dropout", dropout))
