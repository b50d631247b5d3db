"""`kdistill inspect`: every module path of a model, with its input and output shapes on one batch and its
parameters.

Feature and relation losses name the modules they tap by path (`stages.1`, `layer3.0.conv2`, or
`head@input` for what a module receives): this table is how a user finds the paths, and the shapes a
connector would have to map between.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdistill.errors import KdistillError
from kdistill.models.registry import describe_error


@dataclass
class ModuleRow:
    path: str  # "" is the model itself
    kind: str  # the module's class name
    output: str  # per-sample shape(s) of what it returned, "-" if the forward pass did not call it
    params: int  # its parameters, its submodules' included (shared ones once)
    calls: int  # how many times one forward pass called it
    input: str = "-"  # per-sample shape(s) of its positional inputs (what `PATH@input` taps)


def shape_text(output) -> str:
    """Per-sample shapes (the batch dimension left out): `32x28x28`; tuples and dicts joined."""
    if isinstance(output, Tensor):
        return "x".join(str(d) for d in output.shape[1:]) or "scalar"
    if isinstance(output, (tuple, list)):
        return "(" + ", ".join(shape_text(o) for o in output) + ")"
    if isinstance(output, dict):
        return "{" + ", ".join(f"{k}: {shape_text(v)}" for k, v in output.items()) + "}"
    return type(output).__name__


def module_table(model: nn.Module, inputs: Tensor) -> list[ModuleRow]:
    """Run `model` once on `inputs` (eval mode, no autograd; modes restored) and describe every module."""
    outputs: dict[str, str] = {}
    received: dict[str, str] = {}
    calls: dict[str, int] = {}

    def recorder(path: str):
        def record(_module, inputs, output):
            outputs[path] = shape_text(output)
            received[path] = shape_text(inputs[0] if len(inputs) == 1 else inputs)
            calls[path] = calls.get(path, 0) + 1

        return record

    named = list(model.named_modules())
    handles = [module.register_forward_hook(recorder(path)) for path, module in named]
    modes = {module: module.training for _, module in named}
    model.eval()
    try:
        with torch.no_grad():
            model(inputs)
    except KdistillError:
        raise
    except Exception as error:  # a user's forward can raise anything
        raise KdistillError(f"{type(model).__name__} fails on inputs of shape {tuple(inputs.shape[1:])}: "
                            f"{describe_error(error)}") from error
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return [ModuleRow(path, type(module).__name__, outputs.get(path, "-"),
                      sum(p.numel() for p in module.parameters()), calls.get(path, 0), received.get(path, "-"))
            for path, module in named]


TAP_HINT = ("tap a module's output by its path and what it receives by PATH@input (a classifier's input: the "
            "pooled embedding)")


def format_table(rows: list[ModuleRow]) -> str:
    """A fixed-width table of full paths, indented by depth; the model itself as `(model)`."""
    lines = [("path", "module", "input per sample", "output per sample", "parameters")]
    for row in rows:
        depth = row.path.count(".") + 1 if row.path else 0
        output = row.output + (f" ({row.calls} calls)" if row.calls > 1 else "")
        lines.append(("  " * depth + (row.path or "(model)"), row.kind, row.input, output, f"{row.params:,}"))
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d:<{widths[3]}}  {e:>{widths[4]}}"
                      for a, b, c, d, e in lines)
