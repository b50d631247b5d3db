"""An exponential moving average of a model's weights (Polyak averaging; timm's ModelEma).

The average is what gets validated, selected and kept: it is usually a little better than the
last weights, at no cost in training steps. Early steps count more than `decay` would give them
(decay_t = min(decay, (1 + t) / (10 + t))), so the average does not stay near the initial weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class WeightAverage:
    """Shadow copies (fp32) of a model's floating-point parameters and buffers; other buffers (BatchNorm's
    step counters) are copied as they are."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.model, self.decay = model, float(decay)
        state = model.state_dict()  # views of the model's tensors: valid while the model is not moved
        self.shadow = {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
                       for k, v in state.items()}
        floats = [k for k, v in state.items() if v.is_floating_point()]
        self._averaged, self._current = [self.shadow[k] for k in floats], [state[k] for k in floats]
        self._kept = [(self.shadow[k], state[k]) for k in state if k not in floats]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the model's current weights, after optimisation step `step` (0-based)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self._averaged, [v.float() for v in self._current], 1 - decay)
        for target, value in self._kept:
            target.copy_(value)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own again after it."""
        own = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        try:
            self.model.load_state_dict({k: v.to(own[k].dtype) for k, v in self.shadow.items()})
            yield
        finally:
            self.model.load_state_dict(own)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            raise ValueError("the weight average of another model")
        for key, value in state.items():
            self.shadow[key].copy_(value)
