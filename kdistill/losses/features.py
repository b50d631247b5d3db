"""Feature and relation methods as recipe terms: each taps one module of the student and one of the teacher
by path (`kdistill inspect RECIPE` lists them) and applies one function of kdistill.functional.

    distill:
      losses:
        ce: {weight: 1}
        hint: {type: fitnet, student: stages.1, teacher: stages.2, weight: 100}
        at: {student: stages.2, teacher: stages.2, weight: 1000}

Where the two features differ in shape a term may own a `Connector`: built from the shapes seen on
one batch (`Distiller.prepare`), trained with the student, saved and resumed with the term, and never
part of the student's exported weights. The teacher runs live for these terms (its features are not
cached yet).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from kdistill import functional as KF
from kdistill.losses.terms import DistillInputs, LossTerm, register_loss


def _path(name: str, value) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a module path such as 'layer2.1' (kdistill inspect RECIPE lists them), "
                         f"got {value!r}")
    return value


class Connector(nn.Module):
    """Maps a student feature to a teacher feature's shape: for maps [N, C, H, W], a 1x1 convolution and
    batch norm (FitNets' regressor as RepDistiller's `ConvReg` does it, without the ReLU), after
    bilinear resizing when the spatial sizes differ; for vectors, a linear layer. The identity when the
    shapes already agree."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]):
        super().__init__()
        self.size = tuple(teacher_shape[1:]) if len(teacher_shape) == 3 else None
        if tuple(student_shape) == tuple(teacher_shape):
            self.map: nn.Module = nn.Identity()
        elif len(student_shape) == 3 and len(teacher_shape) == 3:
            self.map = nn.Sequential(nn.Conv2d(student_shape[0], teacher_shape[0], 1, bias=False),
                                     nn.BatchNorm2d(teacher_shape[0]))
        elif len(student_shape) == 1 and len(teacher_shape) == 1:
            self.map = nn.Linear(student_shape[0], teacher_shape[0])
        else:
            raise ValueError(f"no connector maps a student feature of shape {tuple(student_shape)} to a teacher "
                             f"feature of shape {tuple(teacher_shape)} (maps to maps, vectors to vectors)")

    def forward(self, feature: Tensor) -> Tensor:
        if self.size is not None and tuple(feature.shape[2:]) != self.size:
            feature = F.interpolate(feature, size=self.size, mode="bilinear", align_corners=False)
        return self.map(feature)


class TapTerm(LossTerm):
    """A term over one student feature and one teacher feature, named by module path."""

    def __init__(self, student: str, teacher: str):
        super().__init__()
        self.student_path, self.teacher_path = _path("student", student), _path("teacher", teacher)
        self.student_taps, self.teacher_taps = (self.student_path,), (self.teacher_path,)

    def features(self, inputs: DistillInputs) -> tuple[Tensor, Tensor]:
        return inputs.student_features[self.student_path], inputs.teacher_features[self.teacher_path]


class ConnectedTerm(TapTerm):
    """A TapTerm whose student feature first goes through a Connector to the teacher feature's shape."""

    def __init__(self, student: str, teacher: str):
        super().__init__(student, teacher)
        self.connector: Connector | None = None

    def prepare(self, student_features, teacher_features) -> None:
        if self.connector is None:
            self.connector = Connector(tuple(student_features[self.student_path].shape[1:]),
                                       tuple(teacher_features[self.teacher_path].shape[1:]))

    def features(self, inputs: DistillInputs) -> tuple[Tensor, Tensor]:
        student, teacher = super().features(inputs)
        if self.connector is None:
            raise RuntimeError(f"{type(self).__name__}: its connector is built from the features' shapes on one "
                               "batch first (Distiller.prepare)")
        return self.connector(student), teacher


@register_loss("fitnet", "FitNets hint: MSE between a connected student feature and a teacher feature "
                         "(Romero et al. 2015)")
class FitNet(ConnectedTerm):
    """mean((connector(f_s) - f_t)^2). RepDistiller weights it 100. Single stage (hint and task together)."""

    def forward(self, inputs: DistillInputs) -> Tensor:
        student, teacher = self.features(inputs)
        return F.mse_loss(student.float(), teacher.float())


@register_loss("at", "attention transfer: where the two networks look, as normalised spatial maps "
                     "(Zagoruyko & Komodakis 2017)")
class AttentionTransfer(TapTerm):
    """RepDistiller weights it 1000 (summed over several pairs: one labelled term per pair here)."""

    def __init__(self, student: str, teacher: str, p: float = 2.0):
        super().__init__(student, teacher)
        if not (math.isfinite(p) and p > 0):
            raise ValueError(f"p must be > 0, got {p}")
        self.p = float(p)

    def forward(self, inputs: DistillInputs) -> Tensor:
        return KF.attention_transfer(*self.features(inputs), self.p)


@register_loss("sp", "similarity preserving: the batch's sample-to-sample similarities (Tung & Mori 2019)")
class SimilarityPreserving(TapTerm):
    """RepDistiller weights it 3000."""

    def forward(self, inputs: DistillInputs) -> Tensor:
        return KF.similarity_preserving(*self.features(inputs))


@register_loss("nst", "neuron selectivity transfer: MMD between channel activation maps (Huang & Wang 2017)")
class NeuronSelectivityTransfer(TapTerm):
    """RepDistiller weights it 50."""

    def forward(self, inputs: DistillInputs) -> Tensor:
        return KF.nst(*self.features(inputs))


@register_loss("rkd_distance", "relational KD: the batch's pairwise distances, normalised (Park et al. 2019)")
class RKDDistance(TapTerm):
    """The paper's weight: 25."""

    def forward(self, inputs: DistillInputs) -> Tensor:
        return KF.rkd_distance(*self.features(inputs))


@register_loss("rkd_angle", "relational KD: the angles every triplet of samples forms (Park et al. 2019)")
class RKDAngle(TapTerm):
    """The paper's weight: 50."""

    def forward(self, inputs: DistillInputs) -> Tensor:
        return KF.rkd_angle(*self.features(inputs))


@register_loss("pkt", "probabilistic knowledge transfer: distributions of cosine similarity between samples "
                      "(Passalis & Tefas 2018)")
class PKT(TapTerm):
    """RepDistiller weights it 30000."""

    def forward(self, inputs: DistillInputs) -> Tensor:
        return KF.pkt(*self.features(inputs))


@register_loss("cc", "correlation congruence between embeddings of the two networks (Peng et al. 2019)")
class CorrelationCongruence(TapTerm):
    """Both features are flattened and mapped by a linear embedding to `dim` and L2-normalised, as
    RepDistiller's `Embed` does; both embeddings train with the student. RepDistiller weights it 0.02."""

    def __init__(self, student: str, teacher: str, dim: int = 128):
        super().__init__(student, teacher)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.embed_student: nn.Linear | None = None
        self.embed_teacher: nn.Linear | None = None

    def prepare(self, student_features, teacher_features) -> None:
        if self.embed_student is None:
            self.embed_student = nn.Linear(student_features[self.student_path][0].numel(), self.dim)
            self.embed_teacher = nn.Linear(teacher_features[self.teacher_path][0].numel(), self.dim)

    def forward(self, inputs: DistillInputs) -> Tensor:
        student, teacher = self.features(inputs)
        if self.embed_student is None:
            raise RuntimeError("cc: its embeddings are built from the features' shapes first (Distiller.prepare)")
        embed_s = F.normalize(self.embed_student(student.flatten(1).float()), dim=1)
        embed_t = F.normalize(self.embed_teacher(teacher.flatten(1).float()), dim=1)
        return KF.correlation_congruence(embed_s, embed_t)


@register_loss("fsp", "flow of solution procedure: Gram matrices between two layers of each network "
                      "(Yim et al. 2017)")
class FSP(LossTerm):
    """Taps two maps per network (`student: [bottom, top]`, `teacher: [bottom, top]`) whose channel
    counts agree between the networks."""

    def __init__(self, student: list, teacher: list):
        super().__init__()
        for name, value in (("student", student), ("teacher", teacher)):
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ValueError(f"{name} must be two module paths [bottom, top], got {value!r}")
        self.student_taps = tuple(_path("student", p) for p in student)
        self.teacher_taps = tuple(_path("teacher", p) for p in teacher)

    def forward(self, inputs: DistillInputs) -> Tensor:
        s = [inputs.student_features[p] for p in self.student_taps]
        t = [inputs.teacher_features[p] for p in self.teacher_taps]
        return KF.fsp(s[0], s[1], t[0], t[1])
