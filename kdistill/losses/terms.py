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

import torch
from torch import Tensor, nn

from kdistill import functional as KF


@dataclass
class DistillInputs:
    """Everything a loss term may read for one batch."""

    student_logits: Tensor
    labels: Tensor | None  # None: an unlabelled batch, for terms that do not read labels
    teacher_logits: Tensor | None = None
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    index: Tensor | None = None  # each row's training sample (view v of sample i: v * samples + i)


class LossTerm(nn.Module):
    """Base class: subclasses implement `forward(inputs) -> scalar tensor`."""

    needs_teacher: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = False  # reads each sample's true class (an unlabelled batch is refused)
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()

    def prepare(self, student_features: dict[str, Tensor], teacher_features: dict[str, Tensor]) -> None:
        """Create what depends on the tapped features' shapes (called once on one batch, before training)."""

    def bind_training_set(self, labels: Tensor, max_batch: int) -> None:
        """Create what depends on the training set, given every training sample's class (a memory bank
        with a row per sample, say) and the most rows one process's batch can have; called once before
        training, after `prepare`, on the device."""

    @property
    def needs_training_set(self) -> bool:
        """Whether this term does anything in `bind_training_set`."""
        return type(self).bind_training_set is not LossTerm.bind_training_set

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
    needs_labels = True

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


@dataclass(frozen=True)
class TermSchedule:
    """When a term counts, by epoch (1-based, as the logs count): from `from_epoch` to `until_epoch`
    (inclusive; None = to the end), its weight ramped up linearly over its first `warmup_epochs`
    (mdistiller's DKD and ReviewKD: min(epoch / warmup, 1))."""

    from_epoch: int = 1
    until_epoch: int | None = None
    warmup_epochs: float = 0.0

    def factor(self, epoch: int) -> float:
        """The weight's factor in 0-based `epoch`: 0 outside the window."""
        current = epoch + 1
        if current < self.from_epoch or (self.until_epoch is not None and current > self.until_epoch):
            return 0.0
        if self.warmup_epochs > 0:
            return min((current - self.from_epoch + 1) / self.warmup_epochs, 1.0)
        return 1.0


class Objective(nn.Module):
    """A weighted sum of named terms; returns the total and each term's value by label.

    Terms with a `TermSchedule` count only in their epochs (`set_epoch`, called by the loop at the start
    of every epoch); a term outside its window is not computed and reports 0.
    """

    def __init__(self, terms: dict[str, LossTerm], weights: dict[str, float], normalize: bool = False,
                 schedules: dict[str, TermSchedule] | None = None):
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
        self.schedules = {label: s for label, s in (schedules or {}).items() if s != TermSchedule()}
        # The warm-up factors live on the device: a Python float changing every epoch would recompile a
        # compiled step each time. Not saved: set_epoch recomputes them on resume.
        ramped = [label for label, schedule in self.schedules.items() if schedule.warmup_epochs > 0]
        self._ramped = {label: i for i, label in enumerate(ramped)}  # label -> its factor's position in `ramp`
        self.register_buffer("ramp", torch.ones(len(self._ramped)), persistent=False)
        self._active = [label for label, w in self.weights.items() if w > 0]

    def _factors(self, epoch: int) -> dict[str, float]:
        """Each term's weight factor in 0-based `epoch` (0: it does not count then)."""
        return {label: self.schedules[label].factor(epoch) if label in self.schedules else 1.0 for label in self.terms}

    def _counting(self, factors: dict[str, float]) -> list[str]:
        return [label for label, w in self.weights.items() if w > 0 and factors[label] > 0]

    def set_epoch(self, epoch: int) -> None:
        """Switch terms on and off and set their warm-up factors for 0-based `epoch`."""
        if not self.schedules:
            return
        factors = self._factors(epoch)
        active = self._counting(factors)
        if not active:
            raise ValueError(f"no loss term counts in epoch {epoch + 1} (from_epoch / until_epoch leave a gap)")
        self._active = active
        if self._ramped:
            self.ramp.copy_(torch.tensor([factors[label] for label in self._ramped], device=self.ramp.device))

    def check_epochs(self, epochs: int) -> None:
        """Raise ValueError when some epoch of `epochs` would have no term (a gap between the windows)."""
        for epoch in range(epochs):
            if not self._counting(self._factors(epoch)):
                raise ValueError(f"no loss term counts in epoch {epoch + 1} of {epochs}: widen a term's "
                                 "from_epoch / until_epoch")

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher and self.weights[k] > 0 for k, t in self.terms.items())

    @property
    def labelled_terms(self) -> list[str]:
        """The counting terms that read true labels: an unlabelled batch cannot be trained on with them."""
        return [k for k, t in self.terms.items() if t.needs_labels and self.weights[k] > 0]

    @property
    def student_taps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for t in self.terms.values() for p in t.student_taps))

    @property
    def teacher_taps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for t in self.terms.values() for p in t.teacher_taps))

    def forward(self, inputs: DistillInputs) -> tuple[Tensor, dict[str, Tensor]]:
        values = {label: self.terms[label](inputs) for label in self._active}
        total = sum(self.weights[label] * (self.ramp[self._ramped[label]] if label in self._ramped else 1.0) * v
                    for label, v in values.items())
        logged = {label: v.detach() for label, v in values.items()}
        for label, weight in self.weights.items():  # a term outside its epochs: reported as 0
            if weight > 0 and label not in logged:
                logged[label] = total.detach().new_zeros(())
        return total, logged


def cross_entropy_objective(label_smoothing: float = 0.0) -> Objective:
    """Plain supervised training (teachers, baselines)."""
    return Objective({"ce": CrossEntropy(label_smoothing)}, {"ce": 1.0})

