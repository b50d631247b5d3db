"""Loss terms: small modules with one shape, `term(inputs) -> scalar`.

A term reads what it needs from `DistillInputs` (logits, labels, tapped features of either
model) and returns a scalar. Terms are nn.Modules so that a term may own learnable
parameters (a connector that maps student features to the teacher's width, say); the
trainer optimises them with the student. A term declares the module paths it wants tapped
(`student_taps`, `teacher_taps`) and whether it needs the teacher at all.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable, ClassVar, NamedTuple

from torch import Tensor, nn

from kdistill import functional as KF


@dataclass
class DistillInputs:
    """Everything a loss term may read for one batch."""

    student_logits: Tensor
    labels: Tensor
    teacher_logits: Tensor | None = None
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)


class LossTerm(nn.Module):
    """Base class: subclasses implement `forward(inputs) -> scalar tensor`."""

    needs_teacher: ClassVar[bool] = True
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()

    def prepare(self, student_features: dict[str, Tensor], teacher_features: dict[str, Tensor]) -> None:
        """Create what depends on the tapped features' shapes (called once on one batch, before training)."""

    def teacher_logits(self, inputs: DistillInputs) -> Tensor:
        if inputs.teacher_logits is None:
            raise RuntimeError(f"{type(self).__name__} needs teacher logits but none were given")
        return inputs.teacher_logits


class LossInfo(NamedTuple):
    cls: type[LossTerm]
    description: str


LOSSES: dict[str, LossInfo] = {}


def register_loss(name: str, description: str) -> Callable[[type[LossTerm]], type[LossTerm]]:
    """Class decorator: make a LossTerm available in config as `distill.losses.<label>.type: name`."""

    def add(cls: type[LossTerm]) -> type[LossTerm]:
        if name in LOSSES:
            raise ValueError(f"loss '{name}' is already registered")
        LOSSES[name] = LossInfo(cls, description)
        return cls

    return add


# Losses scale by T^2: beyond this a temperature is meaningless, and near 1e155 its square overflows.
# Below 0.01 softmax(z / T) is an argmax whose z / T overflows; above 1000 it is uniform and T^2 explodes.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 1000


def check_temperature(temperature: float) -> float:
    number = isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
    if not (number and MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):  # also refuses NaN and inf
        raise ValueError(f"temperature must be >= {MIN_TEMPERATURE} and <= {MAX_TEMPERATURE}, got {temperature!r}")
    return float(temperature)


@register_loss("ce", "cross-entropy with the true labels (optional label smoothing)")
class CrossEntropy(LossTerm):
    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, inputs: DistillInputs) -> Tensor:
        return KF.cross_entropy(inputs.student_logits, inputs.labels, self.label_smoothing)


@register_loss("kd", "T^2 * KL(teacher || student) on temperature-softened outputs (Hinton 2015)")
class KD(LossTerm):
    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = check_temperature(temperature)

    def forward(self, inputs: DistillInputs) -> Tensor:
        return KF.kd_div(inputs.student_logits, self.teacher_logits(inputs), self.temperature)


@register_loss("soft_ce", "T^2 * cross-entropy against the teacher's soft targets (seed 002)")
class SoftCrossEntropy(LossTerm):
    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = check_temperature(temperature)

    def forward(self, inputs: DistillInputs) -> Tensor:
        return KF.soft_cross_entropy(inputs.student_logits, self.teacher_logits(inputs), self.temperature)


@register_loss("logit_mse", "mean squared error between raw logits (Ba & Caruana 2014)")
class LogitMSE(LossTerm):
    def forward(self, inputs: DistillInputs) -> Tensor:
        return KF.logit_mse(inputs.student_logits, self.teacher_logits(inputs))


@register_loss("tang", "alpha * kd + (1 - alpha) * logit MSE (Tang et al. 2019)")
class TangInterpolation(LossTerm):
    def __init__(self, temperature: float = 4.0, alpha: float = 0.5):
        super().__init__()
        self.temperature = check_temperature(temperature)
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)

    def forward(self, inputs: DistillInputs) -> Tensor:
        return KF.tang_interpolation(
            inputs.student_logits, self.teacher_logits(inputs), self.temperature, self.alpha
        )


class Objective(nn.Module):
    """A weighted sum of named terms; returns the total and each term's value by label."""

    def __init__(self, terms: dict[str, LossTerm], weights: dict[str, float], normalize: bool = False):
        super().__init__()
        if not terms:
            raise ValueError("an objective needs at least one loss term")
        if any(w < 0 for w in weights.values()):
            raise ValueError("loss weights must be >= 0")
        total = sum(weights.values())
        if total <= 0:
            raise ValueError("at least one loss weight must be > 0")
        self.terms = nn.ModuleDict(terms)
        self.weights = {k: (w / total if normalize else w) for k, w in weights.items()}

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher and self.weights[k] > 0 for k, t in self.terms.items())

    @property
    def student_taps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for t in self.terms.values() for p in t.student_taps))

    @property
    def teacher_taps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for t in self.terms.values() for p in t.teacher_taps))

    def forward(self, inputs: DistillInputs) -> tuple[Tensor, dict[str, Tensor]]:
        values = {label: term(inputs) for label, term in self.terms.items() if self.weights[label] > 0}
        total = sum(self.weights[label] * v for label, v in values.items())
        return total, {label: v.detach() for label, v in values.items()}


def cross_entropy_objective(label_smoothing: float = 0.0) -> Objective:
    """Plain supervised training (teachers, baselines)."""
    return Objective({"ce": CrossEntropy(label_smoothing)}, {"ce": 1.0})

