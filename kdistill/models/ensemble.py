"""Several models as one: the teacher of multi-teacher distillation, and the ensembles schemes report.

As a registered model, `ensemble` is built from its members' specs and loaded from one file of
all their weights (`members.0.*`, `members.1.*`, ...), so an ensemble teacher is an ordinary
`teacher.checkpoint`. Its soft labels are cached member by member, each entry exactly the one an
offline run with that teacher makes (`cached_teacher_logits`), then combined.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from kdistill.errors import KdistillError
from kdistill.functional import combine_teachers
from kdistill.models.registry import create_model, register_model


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

        self.member_configs: list[str] | None = None  # set by the `ensemble` builder: each member's spec

    def forward(self, inputs: Tensor) -> Tensor:
        return self.combine_logits([member(inputs) for member in self.members])

    def combine_logits(self, logits: Sequence[Tensor]) -> Tensor:
        """The members' logits (or tables of them) as the ensemble's."""
        return combine_teachers(list(logits), self.temperature, self.combine, self.weights)


def member_config(name: str, kwargs: Mapping[str, Any]) -> str:
    """A model's spec as the text a single teacher's soft-label cache entry is keyed by (the pipeline's)."""
    return OmegaConf.to_yaml({"name": name, "kwargs": dict(kwargs)}, resolve=True)


@register_model("ensemble", "several models as one, their softened outputs combined (members: [{name, kwargs}]; "
                            "combine: mean | weights | confidence; weights; temperature)")
def ensemble(input_shape, num_classes: int, members: Sequence[Mapping[str, Any]] = (), combine: str = "mean",
             weights: Sequence[float] | None = None, temperature: float = 1.0) -> Ensemble:
    if not members or not all(isinstance(m, Mapping) and isinstance(m.get("name"), str) for m in members):
        raise KdistillError("ensemble: members must list at least one model, each {name, kwargs}")
    specs = [(m["name"], dict(m.get("kwargs") or {})) for m in members]
    model = Ensemble([create_model(name, input_shape, num_classes, **kwargs) for name, kwargs in specs],
                     combine, weights, temperature)
    model.member_configs = [member_config(name, kwargs) for name, kwargs in specs]
    return model

