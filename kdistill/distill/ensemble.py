"""Several models as one: the teacher of multi-teacher distillation, and the ensembles schemes report."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdistill.functional import combine_teachers


class Ensemble(nn.Module):
    """Logits whose softened distribution is the (weighted) mean of the members' (`combine_teachers`):
    at temperature 1 its argmax is the ensemble's prediction, at the distillation temperature it is
    the combined target. Its members are submodules: moving the ensemble moves them."""

    def __init__(self, members: Sequence[nn.Module], combine: str = "mean", weights: Sequence[float] | None = None,
                 temperature: float = 1.0):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.combine, self.weights, self.temperature = combine, (list(weights) if weights else None), temperature
        # Bad settings fail now, not at the first batch.
        combine_teachers([torch.zeros(1, 2) for _ in self.members], temperature, combine, self.weights)

    def forward(self, inputs: Tensor) -> Tensor:
        return combine_teachers([member(inputs) for member in self.members], self.temperature, self.combine,
                                self.weights)

