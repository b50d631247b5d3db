"""Give a model the layer widths its saved weights have: how a channel-pruned model is rebuilt.

Channel pruning leaves the architecture it started from with fewer channels in some Conv2d, Linear
and BatchNorm layers, and the weights say how many. `fit_to_weights` swaps each such layer for one of
the saved width, so a registered builder, its arguments and the weights file are all a pruned model
needs: no pickled module and no stored graph.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn


def fit_to_weights(model: nn.Module, tensors: Mapping[str, Tensor]) -> nn.Module:
    """Resize, in place, every Conv2d, Linear and BatchNorm of `model` whose weight in `tensors` has
    another shape; returns `model`. Layers of other kinds are left alone (loading then names them)."""
    for path, module in list(model.named_modules()):
        weight = tensors.get(f"{path}.weight" if path else "weight")
        if weight is None or getattr(module, "weight", None) is None or weight.shape == module.weight.shape:
            continue
        resized = _resized(module, tuple(weight.shape))
        if resized is None:
            continue
        resized.to(device=module.weight.device, dtype=module.weight.dtype)
        if path:
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, resized)
    return model


def _resized(module: nn.Module, shape: tuple[int, ...]) -> nn.Module | None:
    if isinstance(module, nn.Conv2d) and len(shape) == 4:
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        groups = shape[0] if depthwise else module.groups
        return nn.Conv2d(shape[1] * groups, shape[0], module.kernel_size, module.stride, module.padding,
                         module.dilation, groups, bias=module.bias is not None, padding_mode=module.padding_mode)
    if isinstance(module, nn.Linear) and len(shape) == 2:
        return nn.Linear(shape[1], shape[0], bias=module.bias is not None)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and len(shape) == 1:
        return type(module)(shape[0], module.eps, module.momentum, module.affine, module.track_running_stats)
    return None
