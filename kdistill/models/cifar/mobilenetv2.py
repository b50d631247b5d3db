"""MobileNetV2 (Sandler et al. 2018) at width 0.5, as RepDistiller's models/mobilenetv2.py builds
`mobile_half` (the KD tables' "MobileNetV2"): a stride-2 stem, seven stages of inverted residuals
(expansion 6), a 1x1 conv to 1280 channels, global average pooling and one linear layer.

Module paths: `conv1`, `blocks.0`..`blocks.6`, `conv2`, `pool`, `classifier` (its linear layer is
`classifier.0`). State-dict keys are the official ones, so RepDistiller's checkpoints load unchanged.
"""

from torch import Tensor, nn

from kdistill.errors import KdistillError
from kdistill.models.cifar.common import conv_bn, init_like_repdistiller
from kdistill.models.registry import register_model

# (expansion, channels, blocks, stride) per stage; the official CIFAR variant keeps stride 1 in stage 2.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(*conv_bn(in_channels, hidden, 1), nn.ReLU(inplace=True),
                                  *conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU(inplace=True),
                                  *conv_bn(hidden, out_channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width_mult: float = 0.5):
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = nn.Sequential(*conv_bn(in_channels, channels, 3, 2), nn.ReLU(inplace=True))
        stages = []
        for expansion, width, blocks, stride in STAGES:
            out_channels = int(width * width_mult)
            layers = []
            for b in range(blocks):
                layers.append(InvertedResidual(channels, out_channels, stride if b == 0 else 1, expansion))
                channels = out_channels
            stages.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(stages)
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = nn.Sequential(*conv_bn(channels, last, 1), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        # A Sequential of one linear layer, as in the official code: its keys are `classifier.0.*`.
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        init_like_repdistiller(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.classifier(self.pool(self.conv2(x)).flatten(1))


@register_model("mobilenetv2", "MobileNetV2 at width 0.5 (RepDistiller's mobile_half), 0.81M params on CIFAR-100")
def mobilenetv2(input_shape: tuple[int, int, int], num_classes: int, width_mult: float = 0.5) -> MobileNetV2:
    if isinstance(width_mult, bool) or not isinstance(width_mult, int | float) or not 0.1 <= width_mult <= 4:
        raise KdistillError(f"model 'mobilenetv2': width_mult must be a number from 0.1 to 4, got {width_mult!r}")
    return MobileNetV2(input_shape[0], num_classes, float(width_mult))
