"""Taps: read intermediate outputs of any nn.Module by module path, with forward hooks.

No model surgery: `FeatureTaps(model, ["layer2.1.conv2"])` records what that submodule
returns on every forward, so any architecture works unchanged.
"""

from __future__ import annotations

import difflib
from typing import Sequence

from torch import Tensor, nn

from kdistill.errors import KdistillError


def check_tap_paths(model: nn.Module, paths: Sequence[str], what: str = "to tap") -> None:
    """Every path names a submodule of `model`; else one line with the nearest valid paths."""
    names = [name for name, _ in model.named_modules() if name]
    for path in paths:
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
        self.features: dict[str, Tensor] = {}
        self._handles = [names[path].register_forward_hook(self._recorder(path)) for path in paths]

    def _recorder(self, path: str):
        def record(_module, _inputs, output):
            self.features[path] = output

        return record

    def pop(self) -> dict[str, Tensor]:
        features, self.features = self.features, {}
        return features

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
