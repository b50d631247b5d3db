"""VGG with BatchNorm for CIFAR, as RepDistiller's models/vgg.py builds `vgg8_bn` and `vgg13_bn`
(the KD tables' "VGG8" and "VGG13"): five conv blocks, max-pools between them, one linear layer.

Module paths: `block0`..`block4` (conv, BN, ReLU, ...; each block's last ReLU is applied in
`forward`, as in the official code), `pool0`..`pool3`, `pool`, `classifier`.
"""

import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.errors import KdistillError
from kdistill.models.cifar.common import init_like_repdistiller
from kdistill.models.registry import register_model

CONFIGS = {"vgg8": ((64,), (128,), (256,), (512,), (512,)),
           "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))}


def _block(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])  # the last ReLU is applied in forward


class CifarVGG(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, config: tuple[tuple[int, ...], ...]):
        super().__init__()
        for i, widths in enumerate(config):
            setattr(self, f"block{i}", _block(in_channels, widths))
            in_channels = widths[-1]
        for i in range(4):
            setattr(self, f"pool{i}", nn.MaxPool2d(2, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        init_like_repdistiller(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        # The official code pools here only for 64x64 inputs: block4 then works on 4x4 maps at 32 or 64 pixels.
        if min(x.shape[-2:]) > 4:
            x = self.pool3(x)
        x = F.relu(self.block4(x))
        return self.classifier(self.pool(x).flatten(1))


def _vgg(name: str, input_shape: tuple[int, int, int], num_classes: int) -> CifarVGG:
    channels, height, width = input_shape
    if min(height, width) < 8:  # three max-pools by 2 come before block3: below 8 pixels the third leaves nothing
        raise KdistillError(f"model {name!r} needs images of at least 8x8 pixels (it max-pools three times by 2), "
                            f"got {height}x{width}; use a resnet, wrn, mobilenetv2 or shufflenetv2 for smaller ones")
    return CifarVGG(channels, num_classes, CONFIGS[name])


@register_model("vgg8", "VGG-8 with BatchNorm (RepDistiller's vgg8_bn), 3.97M params on CIFAR-100: a KD student")
def vgg8(input_shape: tuple[int, int, int], num_classes: int) -> CifarVGG:
    return _vgg("vgg8", input_shape, num_classes)


@register_model("vgg13", "VGG-13 with BatchNorm (RepDistiller's vgg13_bn), 9.46M params on CIFAR-100: a KD teacher")
def vgg13(input_shape: tuple[int, int, int], num_classes: int) -> CifarVGG:
    return _vgg("vgg13", input_shape, num_classes)
