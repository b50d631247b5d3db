"""Taps: read intermediate outputs of any nn.Module by module path, with forward hooks.

No model surgery: `FeatureTaps(model, ["layer2.1.conv2"])` records what that submodule
returns on every forward, so any architecture works unchanged. A module that returns a tuple, a
list or a dict (an LSTM, a transformer block) is tapped at one element: `PATH#INDEX` or `PATH#KEY`
(`lstm#0`, `encoder#last_hidden_state`). `PATH@input` taps what the module receives instead: `head@input`
is the pooled embedding a classifier sees even when the pooling is a function call in `forward`, not a
module (RepDistiller's relation methods use that embedding).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Sequence

from torch import Tensor, nn

from kdistill.errors import KdistillError

INPUT = "@input"


def split_tap(path: str) -> tuple[str, str]:
    """`PATH#ELEMENT` -> (module path, element); element "" when the whole output is tapped. The module
    path keeps an `@input` suffix: see `module_path`."""
    module, _, element = path.partition("#")
    return module, element


def module_path(path: str) -> tuple[str, bool]:
    """The submodule a tap hooks, and whether it takes the module's input (`PATH@input`), not its output."""
    module = split_tap(path)[0]
    return (module.removesuffix(INPUT), True) if module.endswith(INPUT) else (module, False)


def check_tap_paths(model: nn.Module, paths: Sequence[str], what: str = "to tap") -> None:
    """Every path names a submodule of `model`; else one line with the nearest valid paths."""
    names = [name for name, _ in model.named_modules() if name]
    for tap in paths:
        path = module_path(tap)[0]
        if "@" in path:
            name, _, side = path.partition("@")
            raise KdistillError(f"tap '{tap}': '@{side}' is not a side of a module; write {name} for its output or "
                                f"{name}{INPUT} for its input")
        if path not in names:
            close = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
            hint = f"nearest: {', '.join(close)}" if close else \
                f"it has {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
            raise KdistillError(f"no module '{path}' in {type(model).__name__} {what} ({hint}; "
                                "`kdistill inspect RECIPE` lists every path)")


class FeatureTaps:
    """Forward hooks on the given module paths; `pop()` returns and clears what they saw."""

    def __init__(self, model: nn.Module, paths: Sequence[str]):
        check_tap_paths(model, paths)
        names = dict(model.named_modules())
        self.features: dict[str, Any] = {}
        self._handles = [names[module_path(path)[0]].register_forward_hook(self._recorder(path)) for path in paths]

    def _recorder(self, path: str):
        takes_input = module_path(path)[1]

        def record(_module, inputs, output):
            # A module's positional inputs are a tuple: one input is tapped as itself, several by `#INDEX`.
            self.features[path] = (inputs[0] if len(inputs) == 1 else inputs) if takes_input else output

        return record

    def pop(self) -> dict[str, Tensor]:
        """The tensors tapped since the last pop; ValueError naming the tap whose output is no tensor."""
        features, self.features = self.features, {}
        return {path: select(path, output) for path, output in features.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def select(path: str, output: Any) -> Tensor:
    """The tensor that tap `path` (`PATH` or `PATH#ELEMENT`) takes from a module's output."""
    module, elements = split_tap(path)
    value = output
    for element in elements.split("#") if elements else []:  # lstm#1#0: the first of the second
        try:
            if isinstance(value, (tuple, list)):
                value = value[int(element)]
            elif isinstance(value, Mapping):
                value = value[element]
            else:
                value = getattr(value, element)
        except (IndexError, KeyError, AttributeError, ValueError):
            raise ValueError(f"tap '{path}': {module} returns {_describe(output)}, in which {element!r} names "
                             "no element") from None
    if not isinstance(value, Tensor):
        raise ValueError(f"tap '{path}': {module} returns {_describe(value)}, not a tensor; tap one element of "
                         f"it: {_suggest(path, value)}")
    return value


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        parts = ", ".join(_describe(v).removeprefix("a ") for v in value[:4])
        return f"a {type(value).__name__} of {len(value)} ({parts}{', ...' if len(value) > 4 else ''})"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {', '.join(map(str, list(value)[:6]))}"
    return f"a {type(value).__name__}"


def _suggest(path: str, value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ", ".join(f"{path}#{i}" for i in range(min(len(value), 4)))
    if isinstance(value, Mapping):
        return ", ".join(f"{path}#{key}" for key in list(value)[:4])
    return f"{path}#ATTRIBUTE"
