"""The Distiller: a student, a teacher signal and an objective, trained by the one loop.

    from kdistill import Distiller
    Distiller(teacher, student, losses={"ce": {"weight": 0.5}, "kd": {"weight": 0.5}}).fit(loader, epochs=5)

Offline distillation, plain supervised training (no teacher, `losses={"ce": {}}`) and,
later, other schemes are arrangements of the same parts: `training_step` builds the
`DistillInputs` the loss terms read, whatever the teacher signal is.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from kdistill.data.sets import UNLABELLED
from kdistill.distill.signals import CachedTeacher, LiveTeacher, freeze, tensor_digest, weights_digest
from kdistill.distill.taps import FeatureTaps
from kdistill.errors import KdistillError
from kdistill.losses import DEFAULT_LOSSES, DistillInputs, LossTerm, Objective, build_objective
from kdistill.models.registry import describe_error
from kdistill.train.devices import device_of, resolve_device
from kdistill.train.loop import class_of, unpack

# TrainConfig fields that configure kdistill's own loader or plain training, not a Distiller's:
# accepting them from Python and ignoring them would train with other settings than asked for.
LOADER_OPTIONS = {
    "batch_size": "set it on your DataLoader (or kdistill.data.BatchLoader)",
    "augment": "augment in your loader (or pass augment=Augment(...) to kdistill.data.BatchLoader)",
    "label_smoothing": "set it on the cross-entropy term: losses={'ce': {'label_smoothing': 0.1}, ...}",
}


class Distiller(nn.Module):
    """Train `student` against `teacher` (an nn.Module, run live) or cached `soft_labels` (with
    `teacher_features`, {module path: [N, ...] table}, for terms that tap the teacher).

    `losses` is an Objective or a `{label: {type, weight, **params}}` mapping (the
    `distill.losses` config); None means seed 000's 0.5 * CE + 0.5 * KD at `temperature`
    (default 4). The teacher is frozen (eval mode, no gradients) while `fit` trains, then given
    back as it was. `device` ("auto", "cpu", "cuda", "cuda:1", "mps" or a torch.device) moves the
    student, the loss terms, the teacher and the soft labels there; so does `.to(device)`.
    """

    def __init__(
        self,
        teacher: nn.Module | None,
        student: nn.Module,
        losses: Objective | Mapping[str, Any] | None = None,
        *,
        temperature: float | None = None,
        soft_labels: Tensor | None = None,
        teacher_features: Mapping[str, Tensor] | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if losses is None:
            losses = DEFAULT_LOSSES
        if isinstance(losses, Objective):
            if temperature is not None:
                raise KdistillError("temperature applies to losses given as a mapping; a built Objective has its "
                                    "terms' temperatures already")
            self.objective = losses
        else:
            self.objective = build_objective(losses, 4.0 if temperature is None else temperature)
        self.student = student
        self.signal = None
        cached_taps = set(teacher_features or {})
        if self.objective.needs_teacher:
            if soft_labels is not None and set(self.objective.teacher_taps) <= cached_taps:
                self.signal = CachedTeacher(soft_labels, {p: teacher_features[p] for p in self.objective.teacher_taps})
            elif teacher is not None:
                self.signal = LiveTeacher(teacher, self.objective.teacher_taps)
            elif self.objective.teacher_taps:
                raise ValueError("these loss terms read the teacher's features: pass a live `teacher`")
            else:
                raise ValueError("these loss terms need a teacher: pass `teacher` or `soft_labels`")
        # Kept outside the module tree so the teacher's weights are not part of our state.
        self._teacher = [teacher]
        self.student_taps = FeatureTaps(student, self.objective.student_taps) if self.objective.student_taps else None
        if device is not None:
            self.to(resolve_device(device))

    def _apply(self, fn, recurse=True):
        """`.to(device)` and friends move the teacher and the soft-label table along with the student."""
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        if isinstance(self.signal, CachedTeacher):
            self.signal.to(device_of(self.student))
        return self

    @property
    def device(self) -> torch.device:
        return device_of(self.student)

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

    def training_step(self, inputs: Tensor, labels: Tensor | None, index: Tensor | None = None
                      ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One batch: returns (total loss, student logits, each term's value by label). `labels` is None
        for an unlabelled batch, which only terms that do not read labels can learn from."""
        if labels is None and self.objective.labelled_terms:
            terms = ", ".join(f"distill.losses.{label}" for label in self.objective.labelled_terms)
            raise KdistillError(f"this batch has no labels, but the true class is read by {terms}: train on "
                                "unlabelled samples with terms that only need the teacher (kd, js, dist, ...)")
        logits = _run_model(f"student ({type(self.student).__name__})", self.student, inputs)
        student_features = self.student_taps.pop() if self.student_taps else {}
        teacher = None
        if labels is not None and labels.ndim == 2 and isinstance(self.signal, CachedTeacher):
            raise KdistillError("this batch is mixed (mixup or cutmix: its labels are class probabilities) but the "
                                "teacher's logits are cached for unmixed samples: distill mixed batches with a live "
                                "teacher")
        if self.signal is not None:
            teacher = _run_model(f"teacher ({type(self.teacher).__name__})", lambda x: self.signal(x, index), inputs)
        loss, terms = self.objective(
            DistillInputs(
                student_logits=logits,
                labels=labels,
                teacher_logits=teacher.logits if teacher else None,
                student_features=student_features,
                teacher_features=teacher.features if teacher else {},
                index=index,
            )
        )
        return loss, logits, terms

    @torch.no_grad()
    def teacher_accuracy(self, loader, max_batches: int = 4) -> tuple[float, int, int] | None:
        """(accuracy, samples, classes) of the teacher signal on the first batches of `loader`; None without one."""
        if self.signal is None:
            return None
        correct = total = classes = 0
        for batch in itertools.islice(loader, max_batches):
            inputs, labels, index = (None if t is None else t.to(self.device) for t in unpack(batch))
            logits = self.signal(inputs, index).logits
            classes_of = class_of(labels)
            labelled = classes_of != UNLABELLED  # an unlabelled pool's rows have no class to check
            correct += int((logits.argmax(1) == classes_of)[labelled].sum())
            total += int(labelled.sum())
            classes = logits.shape[1]
        return (correct / total, total, classes) if total else None

    @torch.no_grad()
    def fingerprint(self, loader) -> dict:
        """What a resumed training must share with the one it continues: the objective and the teacher.

        The teacher is identified by its weights and by its outputs on the loader's first inputs,
        which also changes when its code or a plain attribute does. Exact digests are right here:
        a resume already requires the same thread count and torch version.
        """
        terms = {label: [type(term).__name__, self.objective.weights[label],
                         {k: v for k, v in vars(term).items()
                          if not k.startswith("_") and k != "training" and isinstance(v, (int, float, str, bool))}]
                 for label, term in self.objective.terms.items()}
        parts = {"objective": terms}
        if isinstance(self.signal, CachedTeacher):
            parts["teacher"] = self.signal.digest()
        elif self.signal is not None:
            set_epoch = getattr(loader, "set_epoch", None)
            if set_epoch is not None:
                set_epoch(0)
            with torch.random.fork_rng(devices=[]):  # a shuffling DataLoader's first batch, the same every time
                torch.manual_seed(0)
                inputs = unpack(next(iter(loader)))[0][:8].to(device_of(self.teacher))
            with self._teacher_lent():
                outputs = self.signal(inputs).logits
            parts["teacher"] = weights_digest(self.teacher) + tensor_digest(outputs.float().cpu())
        return parts

    @torch.no_grad()
    def prepare(self, loader, train_loader=None) -> None:
        """Let each loss term create what depends on the tapped features' shapes (connectors, embeddings),
        from the models' features on the loader's first 8 inputs, and what depends on the training set
        (`train_loader`'s, else `loader`'s); before the optimizer is built or a state restored. Nothing
        trains: both models run in eval mode and are left as they were."""
        terms = [term for term in self.objective.terms.values()
                 if type(term).prepare is not LossTerm.prepare or term.needs_training_set]
        if not terms:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            inputs, _, index = unpack(next(iter(loader)))
        inputs = inputs[:8].to(self.device)
        state = _module_state(self.student)
        try:
            self.student.eval()
            _run_model(f"student ({type(self.student).__name__})", self.student, inputs)
            student_features = self.student_taps.pop() if self.student_taps else {}
        finally:
            _restore_module_state(self.student, state)
        teacher_features = {}
        if isinstance(self.signal, LiveTeacher):
            with self._teacher_lent():
                teacher_features = self.signal(inputs).features
        elif isinstance(self.signal, CachedTeacher) and self.signal.features:
            teacher_features = self.signal(inputs, None if index is None else index[:8].to(self.device)).features
        for term in terms:
            term.prepare(student_features, teacher_features)
        self.objective.to(self.device)
        binders = {label: term for label, term in self.objective.terms.items() if term.needs_training_set}
        if binders:
            source = train_loader or loader
            labels = getattr(getattr(source, "data", None), "labels", None)
            if labels is None:
                raise KdistillError(f"{type(next(iter(binders.values()))).__name__} needs the training set's labels "
                                    "and each batch's sample index: train it with kdistill's BatchLoader")
            labels = labels.to(self.device, torch.long)
            # kdistill's BatchLoader's batch_size is the global batch: a process holds at most its even share
            max_batch = -(-source.batch_size // getattr(source, "world_size", 1))
            for label, term in binders.items():
                try:
                    term.bind_training_set(labels, max_batch)
                except ValueError as error:
                    raise KdistillError(f"distill.losses.{label}: {error}") from None

    def warn_if_teacher_untrained(self, loader) -> None:
        """Warn when the teacher is no better than chance on the first batches: distilling from it teaches noise."""
        measured = self.teacher_accuracy(loader)
        if measured is None or measured[2] < 2:
            return
        accuracy, samples, classes = measured
        chance = 1 / classes
        # Not significantly above chance: within two binomial standard deviations of 1/C.
        if accuracy < chance + 2 * math.sqrt(chance * (1 - chance) / samples):
            warnings.warn(f"the teacher gets {100 * accuracy:.1f} % of the first {samples} training samples right, "
                          f"no better than chance ({100 * chance:.1f} %): is it trained? Distilling from it teaches "
                          "the student noise", stacklevel=2)

    def fit(self, train_loader, epochs: int, *, val_loader=None, seed: int = 0, out_dir=None, resume: bool = False,
            label: str = "distill", progress: str = "auto", device: torch.device | str | None = None,
            **train_options):
        """Train with the one loop; `train_options` are TrainConfig fields (lr, optimizer, schedule, precision, ...).

        `out_dir` keeps metrics.jsonl and a resumable state; `resume=True` continues from it.
        `device` moves everything there first (batches follow: a loader's batches are copied there if
        it builds them elsewhere). Under torchrun the student trains with DistributedDataParallel;
        give each process its shard of the data (e.g. a DistributedSampler, or BatchLoader's rank and
        world_size). The teacher is frozen while training and given back as it was (modes, requires_grad).
        """
        from kdistill.config.loading import train_config
        from kdistill.train import Progress, fit

        for key, fix in LOADER_OPTIONS.items():
            if key in train_options:
                raise KdistillError(f"{key} does not apply to a loader you built: {fix}")
        if train_options.get("early_stop_patience") is not None and val_loader is None:
            raise KdistillError("early_stop_patience needs a val_loader: early stopping watches validation accuracy")
        if resume and out_dir is None:
            raise KdistillError("resume=True needs the out_dir of the interrupted training")
        cfg = train_config(epochs=epochs, **train_options)
        if device is not None:
            self.to(resolve_device(device))
        if isinstance(self.signal, CachedTeacher):  # where the student is, whoever moved it
            self.signal.to(self.device)
        with self._teacher_lent():
            if not (resume and out_dir is not None):
                self.warn_if_teacher_untrained(train_loader)
            return fit(self, train_loader, cfg, val_loader=val_loader, seed=seed, out_dir=out_dir, resume=resume,
                       progress=Progress(progress), label=label, inputs=self.fingerprint(train_loader))

    @contextlib.contextmanager
    def _teacher_lent(self):
        """The caller's teacher, frozen for the `with` block and then given back as it was."""
        if self.teacher is None:
            yield
            return
        state = _module_state(self.teacher)
        try:
            freeze(self.teacher)
            yield
        finally:
            _restore_module_state(self.teacher, state)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.student(inputs)


def _module_state(module: nn.Module) -> tuple[dict[nn.Module, bool], dict[nn.Parameter, bool]]:
    return ({m: m.training for m in module.modules()}, {p: p.requires_grad for p in module.parameters()})


def _restore_module_state(module: nn.Module, state) -> None:
    modes, grads = state
    for m, training in modes.items():
        m.training = training
    for p, requires_grad in grads.items():
        p.requires_grad_(requires_grad)


def _run_model(who: str, model, inputs: Tensor):
    """Call a model on a training batch; what a user's model raises there becomes one line naming it."""
    try:
        return model(inputs)
    except KdistillError:
        raise
    except Exception as error:  # noqa: BLE001  the model is the user's code: say which and on what
        raise KdistillError(f"the {who} failed on a training batch of shape {tuple(inputs.shape)}: "
                            f"{describe_error(error)}") from error
