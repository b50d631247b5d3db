"""Online distillation: models trained together, teaching each other as they learn.

- mode `mutual`, deep mutual learning (Zhang et al. 2018): the student and its peers (any
  architectures) each learn from the labels and from the other peers' softened outputs on the same
  batch, detached; with more than two peers, the mean of the objective over the others.
- mode `teacher`: the recipe's teacher trains alongside the student on the labels alone, and the
  student learns from it live (the teacher is never frozen: it improves as the student learns).

One forward pass per model per step, one backward pass for all (the others' outputs are detached,
so each model's gradient is its own objective's), and each model has its own optimizer, learning
rate schedule and gradient clipping (`optimizer_groups`). KD_Lib's mutual learning updates the
peers one after another against outputs computed before the first update; here every peer
learns from the same step's outputs. Everything else is the one loop: resume, DDP, precision.
The loss terms are the recipe's `distill.losses` (response terms: no model is tapped).

    from kdistill.schemes.online import MutualDistiller
    MutualDistiller([student, peer]).fit(loader, epochs=20, val_loader=val)   # student, peer trained
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from kdistill.errors import KdistillError
from kdistill.evaluation import Entrant
from kdistill.losses import DEFAULT_LOSSES, DistillInputs, Objective, build_objective, cross_entropy_objective
from kdistill.models import create_model
from kdistill.models.ensemble import Ensemble
from kdistill.pipeline import recipe_objective
from kdistill.schemes import register_scheme
from kdistill.schemes.run import SchemeRun, TrainedTogether
from kdistill.train import save_model
from kdistill.train.devices import resolve_device

MAX_PEERS = 8


class Peers(nn.Module):
    """Models trained together, as one module: its output is the `kept` model's logits, so that the loop
    validates, selects and keeps the epoch that is best for the model that will be shipped."""

    def __init__(self, models: Sequence[nn.Module], kept: int = 0):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.kept = kept

    def forward(self, inputs: Tensor) -> Tensor:
        return self.models[self.kept](inputs)


class PeerObjectives(nn.Module):
    """Each model's objective, by name; their terms are logged as `name.term`."""

    def __init__(self, objectives: Mapping[str, Objective]):
        super().__init__()
        self.objectives = nn.ModuleDict(dict(objectives))

    @property
    def weights(self) -> dict[str, float]:
        return {f"{name}.{label}": w for name, o in self.objectives.items() for label, w in o.weights.items()}

    @property
    def schedules(self) -> dict:
        return {f"{name}.{label}": s for name, o in self.objectives.items() for label, s in o.schedules.items()}

    def set_epoch(self, epoch: int) -> None:
        for objective in self.objectives.values():
            objective.set_epoch(epoch)


class MutualDistiller(TrainedTogether):
    """Train `models` together: model k on `objectives[k]` (default: the seed's 0.5 CE + 0.5 KD at T = 4),
    taught by the detached outputs of the models `teachers[k]` lists (default: every other one; [] = the
    labels alone). `train_configs[k]` (TrainConfig-like) gives model k its own optimizer, learning rate,
    schedule, weight decay and clipping (default: the loop's). The loop keeps the best epoch of
    `models[kept]`; the others are taken at that epoch too.
    """

    def __init__(self, models: Sequence[nn.Module], objectives: Sequence[Objective | Mapping] | None = None, *,
                 teachers: Sequence[Sequence[int]] | None = None, names: Sequence[str] | None = None,
                 train_configs: Sequence[Any] | None = None, kept: int = 0,
                 device: torch.device | str | None = None):
        super().__init__()
        count = len(models)
        if count < 2:
            raise KdistillError("online distillation trains at least two models together")
        names = list(names or [f"peer{k + 1}" for k in range(count)])
        objectives = list(objectives or [DEFAULT_LOSSES] * count)
        teachers = [list(t) for t in (teachers or [[j for j in range(count) if j != k] for k in range(count)])]
        if not (len(names) == len(objectives) == len(teachers) == count):
            raise KdistillError(f"{count} models need as many names, objectives and teacher lists")
        for k, sources in enumerate(teachers):
            if any(not 0 <= j < count or j == k for j in sources):
                raise KdistillError(f"model {names[k]} learns from {sources}: list other models' positions")
        built = [o if isinstance(o, Objective) else build_objective(o) for o in objectives]
        for name, objective, sources in zip(names, built, teachers, strict=True):
            if objective.teacher_taps or objective.student_taps:
                raise KdistillError(f"{name}: online distillation uses response terms (kd, js, dist, ...); a term "
                                    "that taps features needs a fixed teacher (scheme offline)")
            if objective.needs_teacher and not sources:
                raise KdistillError(f"{name}'s objective reads a teacher, but it learns from no other model")
        self.student = Peers(models, kept)
        self.objective = PeerObjectives(dict(zip(names, built, strict=True)))
        self.names, self.teachers = names, teachers
        self.train_configs = list(train_configs) if train_configs else None
        if device is not None:
            self.to(resolve_device(device))

    def optimizer_groups(self, cfg) -> list[tuple[list[nn.Parameter], Any]]:
        """Each model with its own objective's parameters, under its own training config (the loop's epochs)."""
        groups = []
        for k, (name, model) in enumerate(zip(self.names, self.student.models, strict=True)):
            own = cfg if self.train_configs is None else _with_epochs(self.train_configs[k], cfg.epochs)
            groups.append(([*model.parameters(), *self.objective.objectives[name].parameters()], own))
        return groups

    def training_step(self, inputs: Tensor, labels: Tensor | None, index: Tensor | None = None
                      ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        logits = [model(inputs) for model in self.student.models]  # one forward pass each
        detached = [z.detach() for z in logits]
        total, terms = 0, {}
        for k, name in enumerate(self.names):
            objective = self.objective.objectives[name]
            sources = self.teachers[k] or [None]
            parts = [objective(DistillInputs(logits[k], labels, None if j is None else detached[j], index=index))
                     for j in sources]
            loss = sum(p[0] for p in parts) / len(parts)  # the mean over the models it learns from
            total = total + loss
            for label in parts[0][1]:
                terms[f"{name}.{label}"] = sum(p[1][label] for p in parts) / len(parts)
        return total, logits[self.student.kept], terms

    def fingerprint(self, loader=None) -> dict:
        """What a resumed training must share with the one it continues (the loop also checks its config)."""
        return {"models": self.names, "teachers": self.teachers, "kept": self.student.kept,
                "objectives": {name: {label: [type(term).__name__, o.weights[label]] for label, term in
                                      o.terms.items()} for name, o in self.objective.objectives.items()},
                "train": [None if c is None else _plain(c) for c in (self.train_configs or [])]}


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(vars(cfg))


def _with_epochs(cfg, epochs: int):
    """A model's own training config, over the loop's epochs (its schedule spans the joint training)."""
    own = copy.deepcopy(cfg)
    if OmegaConf.is_config(own):
        OmegaConf.set_readonly(own, False)
    own.epochs = epochs
    return own


# -- the scheme ----------------------------------------------------------------------------------
ONLINE_MODES = ("mutual", "teacher")


def check_online(cfg) -> None:
    section = cfg.online
    if section.mode not in ONLINE_MODES:
        raise KdistillError(f"online.mode: {section.mode!r} is not one of {', '.join(ONLINE_MODES)}")
    if section.mode == "teacher" and section.peers:
        raise KdistillError("online.peers is for mode mutual; mode teacher trains the recipe's teacher with the "
                            "student")
    if section.mode == "teacher" and cfg.teacher.checkpoint:
        raise KdistillError("online.mode=teacher trains the teacher together with the student from scratch: "
                            "drop teacher.checkpoint (a trained teacher is scheme offline)")
    if len(section.peers) >= MAX_PEERS:
        raise KdistillError(f"online.peers lists {len(section.peers)} peers; at most {MAX_PEERS - 1}")
    for i, peer in enumerate(section.peers):
        if peer.checkpoint:
            raise KdistillError(f"online.peers[{i}].checkpoint: peers are trained from scratch together; drop it")
    objective = recipe_objective(cfg)
    if objective.teacher_taps or objective.student_taps:
        raise KdistillError("distill.losses: online distillation uses response terms (kd, js, dist, ...); a term "
                            "that taps features needs a fixed teacher (scheme offline)")
    if not objective.needs_teacher:
        raise KdistillError("distill.losses: no term reads the other models' outputs, so nothing would be "
                            "distilled; add kd (or js, dist, ...)")


def _peer_specs(cfg) -> list[tuple[str, Any]]:
    """(config key, spec) of the models trained together, the student among them."""
    if cfg.online.mode == "teacher":
        return [("teacher", cfg.teacher), ("student", cfg.student)]
    peers = cfg.online.peers or [cfg.student]
    return [("student", cfg.student), *((f"online.peers[{i}]", p) for i, p in enumerate(peers))]


def plan_online(cfg) -> list[str]:
    together = ", ".join(f"{spec.name} ({key})" for key, spec in _peer_specs(cfg))
    return [f"online/: {together} trained together for {cfg.train.epochs} epochs ({cfg.online.mode})",
            f"scratch/: {cfg.student.name} from scratch"]


@register_scheme("online", "models trained together: deep mutual learning between peers (Zhang et al. 2018), or "
                           "a teacher trained alongside its student", check_online, plan_online)
def online(run: SchemeRun) -> dict:
    cfg = run.cfg
    teacher_mode = cfg.online.mode == "teacher"
    peers = _peer_specs(cfg)
    run.check_models((spec, key) for key, spec in peers)
    # The student from scratch is an ordinary run folder's baseline; its data and loaders serve the peers too.
    with run.pipeline(run.part_config("scratch", {}), trains=("baseline",)) as scratch:
        scratch.model("baseline")
    names = ["teacher", "student"] if teacher_mode else ["student", *(f"peer{k}" for k in range(2, len(peers) + 1))]
    models, kept = [], names.index("student")
    for k, (_, spec) in enumerate(peers):
        torch.manual_seed(cfg.seed if k == kept else cfg.seed + 7_919 * (k + 1))  # the student starts as its baseline
        models.append(create_model(spec.name, scratch.data.input_shape, scratch.data.num_classes,
                                   **OmegaConf.to_container(spec.kwargs, resolve=True)).to(scratch.device))
    if teacher_mode:
        objectives = [cross_entropy_objective(cfg.teacher.train.label_smoothing), recipe_objective(cfg)]
        distiller = MutualDistiller(models, objectives, teachers=[[], [0]], names=names,
                                    train_configs=[cfg.teacher.train, cfg.train], kept=1)
    else:
        distiller = MutualDistiller(models, [recipe_objective(cfg) for _ in models], names=names)
    folder = run.folder / "online"
    trained = run.train_in_folder(distiller, scratch, folder, "online")  # the joint training's, on every row
    if run.main:
        for name, model in zip(names, distiller.student.models, strict=True):  # each model's own file
            save_model(folder / f"{name}.safetensors", model, {"model": name})
    entrants: dict[str, Entrant] = {}
    for name, model in zip(names, distiller.student.models, strict=True):
        title = {"teacher": "teacher (trained with the student)", "student": "student"}.get(name, name)
        entrants[name] = Entrant(model.eval(), folder / f"{name}.safetensors",
                                 {"model": peers[names.index(name)][1].name, "title": title, **trained})
    if not teacher_mode:
        entrants["ensemble"] = Entrant(Ensemble(list(distiller.student.models)), None,
                                       {"model": f"{len(models)} peers", "title": "ensemble of the peers"})
    entrants["baseline"] = scratch.entrant("baseline", "student from scratch")
    return run.compare(entrants, scratch, histories={
        "models trained together (the student's objective)": folder / "metrics.jsonl",
        "student from scratch": scratch.role_dir("baseline") / "metrics.jsonl"})
