"""Taps: read intermediate outputs of any nn.Module by module path, with forward hooks.

No model surgery: `FeatureTaps(model, ["layer2.1.conv2"])` records what that submodule
returns on every forward, so any architecture works unchanged.
"""

from __future__ import annotations

import difflib
from typing import Sequence

from torch import Tensor, nn

from kdistill.errors import KdistillError


class FeatureTaps:
    """Forward hooks on the given module paths; `pop()` returns and clears what they saw."""

    def __init__(self, model: nn.Module, paths: Sequence[str]):
        names = dict(model.named_modules())
        self.features: dict[str, Tensor] = {}
        self._handles = []
        for path in paths:
            if path not in names:
                close = difflib.get_close_matches(path, [n for n in names if n], n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise KdistillError(f"no module '{path}' in {type(model).__name__} to tap{hint}")
            self._handles.append(names[path].register_forward_hook(self._recorder(path)))

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
