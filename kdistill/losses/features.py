"""Feature and relation methods as recipe terms: each taps one module of the student and one of the teacher
by path (`kdistill inspect RECIPE` lists them) and applies one function of kdistill.functional.

    distill:
      losses:
        ce: {weight: 1}
        hint: {type: fitnet, student: stages.1, teacher: stages.2, weight: 100}
        at: {student: stages.2, teacher: stages.2, weight: 1000}

Where the two features differ in shape a term may own a `Connector`: built from the shapes seen on
one batch (`Distiller.prepare`), trained with the student, saved and resumed with the term, and never
part of the student's exported weights. Without augmentation the teacher's features come from a cache
(`cached_teacher_features`, memory-mapped), so these terms do not run the teacher at all.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill import functional as KF
from kdistill.losses.terms import DistillInputs, LossTerm, check_temperature, register_loss
from kdistill.train import distributed


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


class EmbeddingTerm(TapTerm):
    """A TapTerm over embeddings: both features flattened, each mapped by its own linear layer to `dim`
    and L2-normalised (RepDistiller's `Embed`); the two layers train with the student."""

    def __init__(self, student: str, teacher: str, dim: int):
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

    def embeddings(self, inputs: DistillInputs) -> tuple[Tensor, Tensor]:
        if self.embed_student is None:
            raise RuntimeError(f"{type(self).__name__}: its embeddings are built from the features' shapes first "
                               "(Distiller.prepare)")
        student, teacher = self.features(inputs)
        return (F.normalize(self.embed_student(student.flatten(1).float()), dim=1),
                F.normalize(self.embed_teacher(teacher.flatten(1).float()), dim=1))


@register_loss("cc", "correlation congruence between embeddings of the two networks (Peng et al. 2019)")
class CorrelationCongruence(EmbeddingTerm):
    """RepDistiller weights it 0.02."""

    def __init__(self, student: str, teacher: str, dim: int = 128):
        super().__init__(student, teacher, dim)

    def forward(self, inputs: DistillInputs) -> Tensor:
        return KF.correlation_congruence(*self.embeddings(inputs))


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


def _as_map(feature: Tensor) -> Tensor:
    """Vectors [N, C] as 1x1 maps [N, C, 1, 1] (a pooled feature, say); maps unchanged."""
    return feature[:, :, None, None] if feature.ndim == 2 else feature


@register_loss("vid", "variational information distillation: the teacher feature's likelihood under a Gaussian "
                      "regressed from the student's (Ahn et al. 2019)")
class VID(TapTerm):
    """A regressor (1x1 conv, ReLU, 1x1 conv, ReLU, 1x1 conv; `mid_channels` wide, by default the teacher's
    channels) predicts the teacher map's mean from the student's, and a learned variance per channel
    starts at `init_variance`; the larger map is average-pooled to the smaller's size first, as
    RepDistiller's `VIDLoss` does. RepDistiller weights it 1 (one term per pair of layers here)."""

    def __init__(self, student: str, teacher: str, mid_channels: int | None = None, init_variance: float = 5.0,
                 eps: float = 1e-5):
        super().__init__(student, teacher)
        if mid_channels is not None and mid_channels < 1:
            raise ValueError(f"mid_channels must be >= 1, got {mid_channels}")
        if not (math.isfinite(init_variance) and init_variance > eps > 0):
            raise ValueError(f"init_variance must be > eps > 0, got {init_variance} and {eps}")
        self.mid_channels, self.init_variance, self.eps = mid_channels, float(init_variance), float(eps)
        self.regressor: nn.Sequential | None = None
        self.log_scale: nn.Parameter | None = None

    def prepare(self, student_features, teacher_features) -> None:
        if self.regressor is not None:
            return
        student, teacher = student_features[self.student_path], teacher_features[self.teacher_path]
        if student.ndim not in (2, 4) or teacher.ndim not in (2, 4):
            raise ValueError(f"vid regresses maps [N, C, H, W] or vectors [N, C], got {tuple(student.shape)} and "
                             f"{tuple(teacher.shape)}")
        c_in, c_out = student.shape[1], teacher.shape[1]
        mid = self.mid_channels or c_out
        self.regressor = nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), nn.ReLU(),
                                       nn.Conv2d(mid, mid, 1, bias=False), nn.ReLU(),
                                       nn.Conv2d(mid, c_out, 1, bias=False))
        # softplus(log_scale) + eps = init_variance at the start
        start = math.log(math.expm1(self.init_variance - self.eps))
        self.log_scale = nn.Parameter(torch.full((c_out,), start))

    def forward(self, inputs: DistillInputs) -> Tensor:
        if self.regressor is None:
            raise RuntimeError("vid: its regressor is built from the features' shapes first (Distiller.prepare)")
        student, teacher = self.features(inputs)
        student, teacher = KF._pool_to_match(_as_map(student), _as_map(teacher))
        return KF.vid(self.regressor(student.to(self.log_scale.dtype)), teacher, self.log_scale, self.eps)


@register_loss("crd", "contrastive representation distillation: the student's embedding picks out the teacher's "
                      "of the same sample among many others (Tian et al. 2020)")
class CRD(EmbeddingTerm):
    """Both features are embedded (`EmbeddingTerm`). Two memory banks (a row per training sample, on
    the device, saved in checkpoints) hold momentum averages of the embeddings; each sample is
    contrasted with `negatives` rows drawn from samples of other classes (RepDistiller's default,
    'exact' mode). The normalising constants are set from the first batch. RepDistiller: dim 128,
    16384 negatives, T = 0.07, momentum 0.5, weight 0.8. The cost of a step grows with `negatives`
    (two [N, 1 + K, dim] gathers): on a CPU, fewer is faster. Under torchrun every process holds the
    whole banks and applies every process's update of each step (`_from_every_process`), so the banks
    stay equal, and equal to one process's on the same global batches."""

    needs_labels = True  # its negatives are samples of other classes

    def __init__(self, student: str, teacher: str, dim: int = 128, negatives: int = 16384,
                 temperature: float = 0.07, momentum: float = 0.5):
        super().__init__(student, teacher, dim)
        if negatives < 1:
            raise ValueError(f"negatives must be >= 1, got {negatives}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.negatives, self.momentum = negatives, float(momentum)
        self.temperature = check_temperature(temperature)

    def bind_training_set(self, labels: Tensor, max_batch: int) -> None:
        classes = torch.bincount(labels)
        if int((classes > 0).sum()) < 2:
            raise ValueError("crd draws its negatives from other classes: the training set needs at least two")
        n, device = len(labels), labels.device
        bound = 1 / math.sqrt(self.dim / 3)
        # As RepDistiller starts them; saved and resumed. Row n is scratch: under torchrun a process whose
        # batch is shorter pads its share of the step's update with it.
        for name in ("student_memory", "teacher_memory"):
            self.register_buffer(name, (torch.rand(n + 1, self.dim, device=device) * 2 - 1) * bound)
        self._max_batch = max_batch
        self.register_buffer("log_z", torch.full((2,), math.nan, device=device))  # NaN: not set yet
        # Samples sorted by class: the negatives of a class-c sample are drawn from outside c's block.
        self.register_buffer("by_class", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("sample_class", labels.clone(), persistent=False)
        self.register_buffer("class_count", classes, persistent=False)
        self.register_buffer("class_start", torch.cumsum(classes, 0) - classes, persistent=False)

    def _negatives(self, samples: Tensor) -> Tensor:
        """[N, K] sample indices, uniform over the samples of other classes, drawn on the device."""
        c = self.sample_class[samples][:, None]
        count, start = self.class_count[c], self.class_start[c]
        draw = (torch.rand(len(samples), self.negatives, device=samples.device) * (len(self.by_class) - count)).long()
        draw = draw + (draw >= start) * count  # skip the anchor's class block
        return self.by_class[draw]

    def forward(self, inputs: DistillInputs) -> Tensor:
        if not hasattr(self, "student_memory"):
            raise RuntimeError("crd: its memory banks are built before training (Distiller.prepare)")
        if inputs.index is None:
            raise ValueError("crd needs each batch's sample index: train with kdistill's BatchLoader")
        s, t = self.embeddings(inputs)
        n = len(self.sample_class)
        samples = inputs.index % n  # a cached view's row names view * n + sample
        rows = torch.cat([samples[:, None], self._negatives(samples)], dim=1)
        # The student against the teacher's memory, the teacher against the student's (KF.crd, in two halves
        # so that the first batch's scores also set the normalising constants).
        scores = [KF.crd_scores(s, self.teacher_memory[rows], self.temperature),
                  KF.crd_scores(t, self.student_memory[rows], self.temperature)]
        with torch.no_grad():  # Z = mean(exp(score)) * n on the first batch (CRD's estimate), then fixed
            first = torch.stack([torch.logsumexp(x.detach(), dim=(0, 1)) for x in scores])
            first = first - math.log(rows.numel()) + math.log(n)
            if self.training and distributed.world_size() > 1:  # the mean of the processes' estimates: one Z for all
                torch.distributed.all_reduce(first)
                first /= distributed.world_size()
            self.log_z.copy_(torch.where(torch.isnan(self.log_z), first, self.log_z))
        loss = KF.crd_nce(scores[0] - self.log_z[0], n) + KF.crd_nce(scores[1] - self.log_z[1], n)
        if self.training:
            with torch.no_grad():
                samples, s, t = self._from_every_process(samples, s.detach(), t.detach())
                for memory, embedding in ((self.student_memory, s), (self.teacher_memory, t)):
                    memory.index_copy_(0, samples, F.normalize(
                        memory[samples] * self.momentum + embedding * (1 - self.momentum), dim=1))
        return loss

    def _from_every_process(self, samples: Tensor, *rows: Tensor) -> list[Tensor]:
        """This step's `samples` and `rows` of every process, in rank order (as is in one process). Each
        process's share is padded to the largest batch a process can have, with the scratch row."""
        world = distributed.world_size()
        if world == 1:
            return [samples, *rows]
        pad = self._max_batch - len(samples)
        if pad < 0:
            raise ValueError(f"crd: a batch of {len(samples)} rows in one process, more than the {self._max_batch} "
                             "its training set was bound for")
        gathered = []
        for x, fill in ((samples, len(self.sample_class)), *((r, 0) for r in rows)):
            x = torch.cat([x, x.new_full((pad, *x.shape[1:]), fill)])
            parts = [torch.empty_like(x) for _ in range(world)]
            torch.distributed.all_gather(parts, x)
            gathered.append(torch.cat(parts))
        return gathered


class _AttentionFusion(nn.Module):
    """ReviewKD's ABF: a student map to `mid` channels (1x1 conv, BN), fused with the deeper level's
    result by two attention maps, resized to the teacher map's size, then to its channels (3x3 conv, BN).
    Returns (the output for the loss, the fused map for the next, shallower level)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.expand = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(out_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.expand[0].weight, a=1)

    def forward(self, x: Tensor, deeper: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        x = self.reduce(x)
        if self.attention is not None:
            deeper = F.interpolate(deeper, size=x.shape[2:], mode="nearest")
            weights = self.attention(torch.cat([x, deeper], dim=1))
            x = x * weights[:, :1] + deeper * weights[:, 1:]
        if tuple(x.shape[2:]) != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.expand(x), x


@register_loss("review", "review KD: each student level, fused with the deeper ones, matches a teacher level "
                         "(Chen et al. 2021)")
class ReviewKD(LossTerm):
    """Taps the same number of levels in both networks, shallow to deep (`student: [layer1, layer2, pool]`;
    a vector is a 1x1 map). From the deepest level up, attention-based fusion modules carry the deeper
    student levels into each shallower one; each fused map is compared with the teacher's level by
    `hierarchical_context_loss`. Fusion width: min(512, the deepest student level's channels), as in
    mdistiller. mdistiller weights it 1 on CIFAR (8 on ImageNet), with `warmup_epochs: 20`."""

    def __init__(self, student: list, teacher: list, mid_channels: int | None = None):
        super().__init__()
        for name, value in (("student", student), ("teacher", teacher)):
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"{name} must list module paths shallow to deep, got {value!r}")
        if len(student) != len(teacher):
            raise ValueError(f"review pairs levels: student and teacher must list as many paths, got {len(student)} "
                             f"and {len(teacher)}")
        if mid_channels is not None and mid_channels < 1:
            raise ValueError(f"mid_channels must be >= 1, got {mid_channels}")
        self.student_taps = tuple(_path("student", p) for p in student)
        self.teacher_taps = tuple(_path("teacher", p) for p in teacher)
        self.mid_channels = mid_channels
        self.fusions: nn.ModuleList | None = None  # deepest level first

    def _levels(self, features: dict[str, Tensor], paths: tuple[str, ...], role: str) -> list[Tensor]:
        maps = [_as_map(features[p]) for p in paths]
        for path, feature in zip(paths, maps, strict=True):
            if feature.ndim != 4:
                raise ValueError(f"review fuses maps [N, C, H, W] or vectors [N, C]; the {role}'s {path} gives "
                                 f"{tuple(feature.shape)}")
        return maps

    def prepare(self, student_features, teacher_features) -> None:
        if self.fusions is not None:
            return
        student = self._levels(student_features, self.student_taps, "student")
        teacher = self._levels(teacher_features, self.teacher_taps, "teacher")
        mid = self.mid_channels or min(512, student[-1].shape[1])
        deepest = len(student) - 1
        self.fusions = nn.ModuleList(_AttentionFusion(s.shape[1], mid, t.shape[1], fuse=i < deepest)
                                     for i, (s, t) in reversed(list(enumerate(zip(student, teacher, strict=True)))))

    def forward(self, inputs: DistillInputs) -> Tensor:
        if self.fusions is None:
            raise RuntimeError("review: its fusion modules are built from the features' shapes first "
                               "(Distiller.prepare)")
        student = self._levels(inputs.student_features, self.student_taps, "student")[::-1]
        teacher = self._levels(inputs.teacher_features, self.teacher_taps, "teacher")[::-1]
        outputs, fused = [], None
        for fusion, s, t in zip(self.fusions, student, teacher, strict=True):
            out, fused = fusion(s.float(), fused, tuple(t.shape[2:]))
            outputs.append(out)
        return KF.hierarchical_context_loss(outputs[::-1], teacher[::-1])
