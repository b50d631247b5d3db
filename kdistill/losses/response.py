"""Response methods beyond Hinton's KD: each a registered term over one pure function of kdistill.functional.

All read only the two models' logits (DKD also the labels), so they work with every teacher signal,
the cached ones included.
"""

from __future__ import annotations

from torch import Tensor

from kdistill import functional as KF
from kdistill.losses.terms import DistillInputs, LossTerm, check_temperature, register_loss


def _non_negative(name: str, value: float) -> float:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


@register_loss("dkd", "decoupled KD: alpha * target-class KD + beta * non-target-class KD (Zhao et al. 2022)")
class DKD(LossTerm):
    """Defaults are the paper's CIFAR-100 ones (alpha 1, beta 8, T 4). The official code also ramps the
    term up linearly over its first 20 epochs: give the term `warmup_epochs: 20` for that."""

    needs_labels = True  # it separates the target class from the others

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0):
        super().__init__()
        self.alpha, self.beta = _non_negative("alpha", alpha), _non_negative("beta", beta)
        self.temperature = check_temperature(temperature)

    def forward(self, inputs: DistillInputs) -> Tensor:
        return KF.dkd(inputs.student_logits, self.teacher_logits(inputs), inputs.labels, self.alpha, self.beta,
                      self.temperature)


@register_loss("dist", "correlation of predictions across classes and across the batch (Huang et al. 2022)")
class DIST(LossTerm):
    """Defaults: beta = gamma = 1, T = 1 (the paper's ImageNet setting; its CIFAR one uses T = 4)."""

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0):
        super().__init__()
        self.beta, self.gamma = _non_negative("beta", beta), _non_negative("gamma", gamma)
        self.temperature = check_temperature(temperature)

    def forward(self, inputs: DistillInputs) -> Tensor:
        return KF.dist(inputs.student_logits, self.teacher_logits(inputs), self.beta, self.gamma, self.temperature)


@register_loss("ls_kd", "KD on logits standardised per sample (zero mean, unit deviation; Sun et al. 2024)")
class LogitStandardizedKD(LossTerm):
    def __init__(self, temperature: float = 2.0):
        super().__init__()
        self.temperature = check_temperature(temperature)

    def forward(self, inputs: DistillInputs) -> Tensor:
        return KF.logit_standardized_kd(inputs.student_logits, self.teacher_logits(inputs), self.temperature)


@register_loss("reverse_kd", "T^2 * KL(student || teacher) on softened outputs: mode-seeking")
class ReverseKD(LossTerm):
    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = check_temperature(temperature)

    def forward(self, inputs: DistillInputs) -> Tensor:
        return KF.reverse_kd(inputs.student_logits, self.teacher_logits(inputs), self.temperature)


@register_loss("js", "T^2 * Jensen-Shannon divergence between softened outputs: symmetric, bounded")
class JensenShannon(LossTerm):
    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = check_temperature(temperature)

    def forward(self, inputs: DistillInputs) -> Tensor:
        return KF.js_divergence(inputs.student_logits, self.teacher_logits(inputs), self.temperature)
