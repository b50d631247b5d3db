"""Questions asked of a built model: how many parameters, how many output classes."""

import torch
from torch import nn

from kdistill.errors import KdistillError
from kdistill.models.registry import describe_error


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared ones counted once), trainable or not."""
    return sum(p.numel() for p in model.parameters())


def output_classes(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Width of the logits `model` gives for inputs of shape (C, H, W).

    Runs one forward pass on a batch of two zero images in eval mode, without autograd, and
    puts every submodule back in the train/eval mode it was in (a frozen BatchNorm inside a
    training model stays frozen).
    """
    # no_grad rather than inference_mode: lazy layers (nn.LazyLinear) create their weights in
    # this first call, and weights created under inference_mode are inference tensors.
    first = next(model.parameters(), None)
    device, dtype = (first.device, first.dtype) if first is not None else (torch.device("cpu"), torch.float32)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.zeros(2, *input_shape, device=device, dtype=dtype))
    except KdistillError:
        raise
    except Exception as error:  # a user's forward can raise anything; shape mismatches raise RuntimeError
        raise KdistillError(f"{type(model).__name__} fails on inputs of shape {tuple(input_shape)}: "
                            f"{describe_error(error)}; build the model for the data's image size and channels, "
                            "and check that its forward runs") from error
    finally:
        for module, training in modes.items():
            module.training = training
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise KdistillError(f"{type(model).__name__} must return logits of shape [batch, classes], got {shape}")
    return logits.shape[-1]


def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates per sample of the Conv and Linear layers, counted exactly on one forward pass.

    A conv output element costs (in_channels / groups) * kernel area MACs, a Linear output element
    in_features; element-wise work (BatchNorm, ReLU, pooling, residual adds) is not counted, as is usual.
    Dense count: zeroed weights (unstructured pruning) still run, so they still count.
    """
    total = 0

    def conv(module: nn.Conv2d, _inputs, output) -> None:
        nonlocal total
        per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        total += output.numel() // output.shape[0] * per_output

    def linear(module: nn.Linear, _inputs, output) -> None:
        nonlocal total
        total += output.numel() // output.shape[0] * module.in_features

    hooks = [module.register_forward_hook(conv if isinstance(module, nn.Conv2d) else linear)
             for module in model.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return total
