"""Pieces the CIFAR models share."""

import math

from torch import nn


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    # No conv bias: the BatchNorm right after it has its own shift.
    return [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, groups=groups,
                      bias=False), nn.BatchNorm2d(out_channels)]


def init_like_repdistiller(model: nn.Module, *, linear_std: float | None = None) -> None:
    """He-normal convolutions (std sqrt(2 / (k * k * out))), BatchNorm at 1 and 0, linear biases at 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            nn.init.normal_(module.weight, 0, math.sqrt(2 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(module.weight, 0, linear_std)
            nn.init.zeros_(module.bias)
