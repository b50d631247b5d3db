"""Pruning a trained student: zeroed weights (unstructured) or removed channels (structured).

- `unstructured`: global magnitude pruning (the smallest |w| over every Conv and Linear weight
  zeroed, Han et al. 2015). The zeros are held by a mask parametrization
  (torch.nn.utils.parametrize), so fine-tuning cannot revive them; `bake_masks` folds the masks
  into plain weights for export. Same shape, same dense speed: its gain is compressibility.
- `channels`: the lowest-L2 channels of every layer removed, the same share in each (or ranked
  across layers: `channels_global`). Torch-Pruning traces the dependencies (a residual add, a
  flatten into a Linear, a BatchNorm after a conv) so coupled layers lose the same channels; the
  result is a smaller dense network that really runs faster. Chosen over torch.nn.utils.prune
  (masks only, nothing removed) and over hand-written graph surgery, which breaks on the first
  residual connection; it is maintained and handles arbitrary nn.Module graphs.

The classifier (the last Linear layer) keeps its outputs: they are the classes.
"""

from __future__ import annotations

import copy
import warnings
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from kdistill.errors import KdistillError

METHODS = ("unstructured", "channels", "channels_global")
PRUNABLE = (nn.Conv2d, nn.Linear)


class Pruning(NamedTuple):
    """One pruning step: a method of METHODS and the share removed, in [0, 1)."""

    method: str
    amount: float

    @property
    def name(self) -> str:
        return f"{self.method}{round(100 * self.amount):02d}"


def parse_pruning(text: str, where: str = "--prune") -> Pruning:
    """'channels:0.5' -> Pruning('channels', 0.5), with one-line errors for anything else."""
    method, _, amount = text.partition(":")
    if method not in METHODS:
        raise KdistillError(f"{where} {text!r}: the method must be one of {', '.join(METHODS)}, "
                            "e.g. channels:0.5")
    try:
        value = float(amount)
    except ValueError:
        raise KdistillError(f"{where} {text!r}: give the share to remove after a colon, e.g. {method}:0.5") from None
    if not 0 <= value < 1:
        raise KdistillError(f"{where} {text!r}: the share to remove must be in [0, 1), got {value:g} "
                            "(0.5 removes half; 1 would remove everything)")
    return Pruning(method, value)


def classifier_of(model: nn.Module) -> nn.Module | None:
    """The last Linear layer: its outputs are the classes, so no pruning touches them."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else None


def prune(model: nn.Module, pruning: Pruning, input_shape: tuple[int, int, int]) -> nn.Module:
    """A pruned copy of `model` (on the CPU, eval mode); `model` is left as it was."""
    pruned = copy.deepcopy(model).cpu().eval()
    if pruning.amount == 0:
        return pruned
    if pruning.method == "unstructured":
        return mask_smallest(pruned, pruning.amount)
    return remove_channels(pruned, pruning.amount, input_shape, ranked_globally=pruning.method == "channels_global")


# -- unstructured -------------------------------------------------------------------------------
class WeightMask(nn.Module):
    """weight -> weight * mask: a parametrization, so the optimizer sees the weight and never the zeros."""

    def __init__(self, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask


def mask_smallest(model: nn.Module, amount: float) -> nn.Module:
    """Zero the `amount` share of Conv and Linear weights smallest in magnitude over the whole model."""
    layers = [m for m in model.modules() if isinstance(m, PRUNABLE)]
    if not layers:
        raise KdistillError(f"{type(model).__name__} has no Conv2d or Linear layer to prune")
    magnitudes = torch.cat([m.weight.detach().abs().flatten() for m in layers])
    count = int(amount * magnitudes.numel())
    if count == 0:
        return model
    # The count-th smallest magnitude; ties at it are pruned too, which changes the share by a few weights.
    threshold = magnitudes.kthvalue(count).values
    for module in layers:
        mask = (module.weight.detach().abs() > threshold).to(module.weight.dtype)
        parametrize.register_parametrization(module, "weight", WeightMask(mask))
    return model


def bake_masks(model: nn.Module) -> nn.Module:
    """Fold mask parametrizations into plain weights (zeros included): the exported model has none."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def sparsity(model: nn.Module) -> float:
    """The share of Conv and Linear weights that are exactly zero."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, PRUNABLE)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


# -- channels -----------------------------------------------------------------------------------
def remove_channels(model: nn.Module, amount: float, input_shape: tuple[int, int, int], *,
                    ranked_globally: bool = False) -> nn.Module:
    import torch_pruning as tp

    example = torch.zeros(1, *input_shape)
    before = {name: _width(m) for name, m in model.named_modules() if isinstance(m, PRUNABLE)}
    classifier = classifier_of(model)
    if not ranked_globally:  # each layer keeps int(width * (1 - amount)) channels: none is no layer
        emptied = [f"'{name}' ({width} channels)" for name, m in model.named_modules()
                   if isinstance(m, PRUNABLE) and m is not classifier and int((width := _width(m)) * (1 - amount)) == 0]
        if emptied:
            raise KdistillError(f"removing {amount:g} of every layer's channels would remove every channel of "
                                f"{', '.join(emptied[:3])}; use a share below {1 - 1 / min(before.values()):g}, or "
                                "'channels_global' (ranked across layers)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Torch-Pruning warns about modules it does not know, then copes
            pruner = tp.pruner.BasePruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                          pruning_ratio=amount, global_pruning=ranked_globally,
                                          ignored_layers=[classifier] if classifier is not None else [])
            pruner.step()
    except KdistillError:
        raise
    except Exception as error:  # noqa: BLE001  Torch-Pruning fails on graphs it cannot trace
        raise KdistillError(f"cannot remove channels from {type(model).__name__}: Torch-Pruning failed "
                            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); use unstructured "
                            "pruning for this model") from None
    emptied = [name for name, m in model.named_modules() if isinstance(m, PRUNABLE) and _width(m) == 0]
    if emptied:
        raise KdistillError(f"removing {amount:g} of the channels ranked across layers would remove every channel "
                            f"of {', '.join(emptied[:3])}; use a smaller share, or 'channels' (the same share of "
                            "each layer)")
    if all(_width(m) == before[name] for name, m in model.named_modules() if name in before):
        raise KdistillError(f"removing a share of {amount:g} removes no channel of {type(model).__name__} (its "
                            "layers are too narrow); use a larger share")
    return model


def _width(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
