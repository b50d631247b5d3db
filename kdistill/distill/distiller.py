"""The Distiller: a student, a teacher signal and an objective, trained by the one loop.

    from kdistill import Distiller
    Distiller(teacher, student, losses={"ce": {"weight": 0.5}, "kd": {"weight": 0.5}}).fit(loader, epochs=5)

Offline distillation, plain supervised training (no teacher, `losses={"ce": {}}`) and,
later, other schemes are arrangements of the same parts: `training_step` builds the
`DistillInputs` the loss terms read, whatever the teacher signal is.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from kdistill.distill.signals import CachedTeacher, LiveTeacher
from kdistill.distill.taps import FeatureTaps
from kdistill.losses import DEFAULT_LOSSES, DistillInputs, Objective, build_objective


class Distiller(nn.Module):
    """Train `student` against `teacher` (an nn.Module, run live) or cached `soft_labels`.

    `losses` is an Objective or a `{label: {type, weight, **params}}` mapping (the
    `distill.losses` config); None means seed 000's 0.5 * CE + 0.5 * KD at `temperature`.
    """

    def __init__(
        self,
        teacher: nn.Module | None,
        student: nn.Module,
        losses: Objective | Mapping[str, Any] | None = None,
        *,
        temperature: float = 4.0,
        soft_labels: Tensor | None = None,
    ):
        super().__init__()
        if losses is None:
            losses = DEFAULT_LOSSES
        self.objective = losses if isinstance(losses, Objective) else build_objective(losses, temperature)
        self.student = student
        self.signal = None
        if self.objective.needs_teacher:
            if soft_labels is not None and not self.objective.teacher_taps:
                self.signal = CachedTeacher(soft_labels)
            elif teacher is not None:
                self.signal = LiveTeacher(teacher, self.objective.teacher_taps)
            elif self.objective.teacher_taps:
                raise ValueError("these loss terms read the teacher's features: pass a live `teacher`")
            else:
                raise ValueError("these loss terms need a teacher: pass `teacher` or `soft_labels`")
        # Kept outside the module tree so the teacher's weights are not part of our state.
        self._teacher = [teacher]
        self.student_taps = FeatureTaps(student, self.objective.student_taps) if self.objective.student_taps else None

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0]

    def train(self, mode: bool = True) -> "Distiller":
        """Only the student (and the loss terms) train; the teacher stays in eval mode."""
        self.training = mode
        self.student.train(mode)
        self.objective.train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.student.parameters(), *self.objective.parameters()]

    def training_step(self, inputs: Tensor, labels: Tensor, index: Tensor | None = None
                      ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One batch: returns (total loss, student logits, each term's value by label)."""
        logits = self.student(inputs)
        student_features = self.student_taps.pop() if self.student_taps else {}
        teacher = self.signal(inputs, index) if self.signal is not None else None
        loss, terms = self.objective(
            DistillInputs(
                student_logits=logits,
                labels=labels,
                teacher_logits=teacher.logits if teacher else None,
                student_features=student_features,
                teacher_features=teacher.features if teacher else {},
            )
        )
        return loss, logits, terms

    def fit(self, train_loader, epochs: int, *, val_loader=None, seed: int = 0, out_dir=None,
            progress: str = "auto", **train_options):
        """Train with the one loop; `train_options` are TrainConfig fields (lr, optimizer, ...)."""
        from kdistill.config.loading import train_config
        from kdistill.train import Progress, fit

        cfg = train_config(epochs=epochs, **train_options)
        return fit(self, train_loader, cfg, val_loader=val_loader, seed=seed, out_dir=out_dir,
                   progress=Progress(progress))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.student(inputs)
