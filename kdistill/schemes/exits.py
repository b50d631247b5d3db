"""Deep-to-shallow self-distillation with auxiliary exits (Zhang et al. 2019, "Be Your Own Teacher").

Classifiers are attached by tap path to shallow stages of one unmodified network; each learns from
the labels, from the network's deepest output (softened, detached) and from its deepest feature
through its own bottleneck. Per exit i, as in the official code (luanyunteng/pytorch-be-your-own-
teacher, T = 3, alpha = 0.1, beta = 1e-6 on a sum over the batch):

    (1 - alpha) * CE(exit_i) + alpha * T^2 * KL(deep / T || exit_i / T)
        + beta * sum over features of (f_i - f_deep)^2 where f_i > 0 or f_deep > 0

and the deepest output (1 - alpha) * CE. Here the feature term is summed per sample and averaged over
the batch, so `feature_weight` = beta x batch size (1.28e-4 = the official 1e-6 at batch 128).
The exits train the shared layers too (that is the method); they are saved apart from the model,
which is exported unchanged. `EarlyExit` runs the network only up to an exit's tap, so an exit's
latency is what early exit at deployment costs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdistill import functional as KF
from kdistill.distill.taps import FeatureTaps, check_tap_paths, module_path, select
from kdistill.errors import KdistillError
from kdistill.evaluation import Entrant
from kdistill.models import count_parameters
from kdistill.pipeline import MODEL_FILE
from kdistill.schemes.run import SchemeRun, TrainedTogether
from kdistill.train.devices import device_of
from kdistill.train.loop import unpack


def last_linear_input(model: nn.Module) -> str:
    """The tap of the deepest feature by default: what the model's last Linear layer receives."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise KdistillError(f"{type(model).__name__} has no Linear layer whose input is its deepest feature: give "
                            "self_distill.deepest (a tap path)")
    return f"{linears[-1]}@input"


class ExitHead(nn.Module):
    """A classifier on a shallow feature: a bottleneck to the deepest feature's `width` (for maps: 1x1 conv,
    3x3 conv with stride 2, 1x1 conv, each with BatchNorm and ReLU, then global average pooling, as the
    official bottleneck; for vectors: a Linear and ReLU), then a Linear classifier."""

    def __init__(self, feature_shape: Sequence[int], width: int, classes: int):
        super().__init__()
        if len(feature_shape) == 3:
            channels, middle = feature_shape[0], max(width // 4, 8)
            self.bottleneck = nn.Sequential(
                nn.Conv2d(channels, middle, 1, bias=False), nn.BatchNorm2d(middle), nn.ReLU(),
                nn.Conv2d(middle, middle, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(middle), nn.ReLU(),
                nn.Conv2d(middle, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten())
        elif len(feature_shape) == 1:
            self.bottleneck = nn.Sequential(nn.Linear(feature_shape[0], width), nn.ReLU())
        else:
            raise KdistillError(f"an exit needs a feature map [C, H, W] or a vector [C], got a feature of shape "
                                f"{list(feature_shape)}")
        self.classifier = nn.Linear(width, classes)

    def forward(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        embedding = self.bottleneck(feature)
        return embedding, self.classifier(embedding)


def exit_feature_loss(embedding: Tensor, deepest: Tensor) -> Tensor:
    """BYOT's feature term, per sample: the squared differences where either feature is positive, summed over
    the feature, averaged over the batch (the deepest feature is the target: detached)."""
    embedding, deepest = embedding.float().flatten(1), deepest.detach().float().flatten(1)
    if embedding.shape != deepest.shape:
        raise ValueError(f"an exit's embedding {tuple(embedding.shape)} and the deepest feature "
                         f"{tuple(deepest.shape)} differ in shape")
    active = (embedding > 0) | (deepest > 0)
    return ((embedding - deepest).pow(2) * active).sum(1).mean()


class ExitObjective(nn.Module):
    """The exits' heads (made from the tapped shapes by `prepare`) and the loss weights, for the loop to log."""

    def __init__(self, exits: Sequence[str], alpha: float, temperature: float, feature_weight: float):
        super().__init__()
        self.exits = list(exits)
        self.heads = nn.ModuleDict()
        self.alpha, self.temperature, self.feature_weight = alpha, temperature, feature_weight

    @staticmethod
    def key(path: str) -> str:
        return path.replace(".", "_").replace("@", "_at_").replace("#", "_")

    @property
    def weights(self) -> dict[str, float]:
        weights = {"deepest.ce": 1 - self.alpha}
        for path in self.exits:
            weights.update({f"{path}.ce": 1 - self.alpha, f"{path}.kd": self.alpha,
                            f"{path}.feature": self.feature_weight})
        return weights

    schedules: dict = {}

    def set_epoch(self, epoch: int) -> None:
        pass


class SelfDistiller(TrainedTogether):
    """Train `model` with exits at the tap paths `exits`, taught by its deepest output and feature (`deepest`,
    default the input of its last Linear). The loop selects on the deepest output; `exit_models()` gives
    each exit as a model of its own."""

    def __init__(self, model: nn.Module, exits: Sequence[str], *, deepest: str | None = None, alpha: float = 0.1,
                 temperature: float = 3.0, feature_weight: float = 1.28e-4):
        super().__init__()
        if not exits:
            raise KdistillError("self_distill.exits is empty: list the tap paths of the shallow stages that get a "
                                "classifier (`kdistill inspect RECIPE` shows them)")
        self.deepest = deepest or last_linear_input(model)
        check_tap_paths(model, [*exits, self.deepest], "for self_distill.exits / deepest")
        if self.deepest in exits:
            raise KdistillError(f"self_distill.exits lists {self.deepest}, the deepest feature: exits are shallower")
        self.student = model
        self.objective = ExitObjective(exits, alpha, temperature, feature_weight)
        self.taps = FeatureTaps(model, [*exits, self.deepest])

    @torch.no_grad()
    def prepare(self, loader, train_loader=None) -> None:
        """Make each exit's head from its tapped feature's shape on a few inputs (before the optimizer exists)."""
        if len(self.objective.heads) == len(self.objective.exits):
            return
        inputs = unpack(next(iter(loader)))[0][:2].to(device_of(self.student))
        modes = {m: m.training for m in self.student.modules()}
        self.student.eval()
        try:
            logits = self.student(inputs)
            features = self.taps.pop()
        finally:
            for module, training in modes.items():
                module.training = training
        width = features[self.deepest].flatten(1).shape[1]
        for path in self.objective.exits:
            head = ExitHead(tuple(features[path].shape[1:]), width, logits.shape[1])
            self.objective.heads[ExitObjective.key(path)] = head.to(inputs.device)

    def training_step(self, inputs: Tensor, labels: Tensor | None, index: Tensor | None = None
                      ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if labels is None or labels.ndim != 1:
            raise KdistillError("self-distillation with exits trains on labelled, unmixed batches")
        objective = self.objective
        deep = self.student(inputs)
        features = self.taps.pop()
        target = deep.detach()
        terms = {"deepest.ce": KF.cross_entropy(deep, labels)}
        for path in objective.exits:
            embedding, logits = objective.heads[ExitObjective.key(path)](features[path])
            terms[f"{path}.ce"] = KF.cross_entropy(logits, labels)
            terms[f"{path}.kd"] = KF.kd_div(logits, target, objective.temperature)
            terms[f"{path}.feature"] = exit_feature_loss(embedding, features[self.deepest])
        loss = sum(objective.weights[label] * value for label, value in terms.items())
        return loss, deep, {label: value.detach() for label, value in terms.items()}

    def fingerprint(self, loader=None) -> dict:
        o = self.objective
        return {"exits": o.exits, "deepest": self.deepest, "alpha": o.alpha, "temperature": o.temperature,
                "feature_weight": o.feature_weight}

    def exit_models(self) -> dict[str, EarlyExit]:
        return {path: EarlyExit(self.student, path, self.objective.heads[ExitObjective.key(path)])
                for path in self.objective.exits}

class _Exited(Exception):
    def __init__(self, logits: Tensor):
        self.logits = logits


class EarlyExit(nn.Module):
    """The network up to tap `path`, then that exit's head: the forward pass stops at the tap."""

    def __init__(self, model: nn.Module, path: str, head: ExitHead):
        super().__init__()
        self.model, self.path, self.head = model, path, head
        self._running = False  # the hook stops only this exit's own forward passes, not the model's
        name, takes_input = module_path(path)
        module = dict(model.named_modules())[name]

        def stop(_module, inputs, output=None):
            if self._running:
                feature = (inputs[0] if len(inputs) == 1 else inputs) if takes_input else output
                raise _Exited(self.head(select(path, feature))[1])

        if takes_input:
            module.register_forward_pre_hook(stop)
        else:
            module.register_forward_hook(stop)

    def forward(self, inputs: Tensor) -> Tensor:
        self._running = True
        try:
            self.model(inputs)
        except _Exited as exited:
            return exited.logits
        finally:
            self._running = False
        raise RuntimeError(f"the forward pass never reached exit {self.path}")

    def used_parameters(self, input_shape: Sequence[int]) -> int:
        """Parameters of the modules that run before the exit, and of its head."""
        ran: set[nn.Module] = set()
        hooks = [m.register_forward_pre_hook(lambda module, _: ran.add(module)) for m in self.model.modules()
                 if not list(m.children())]
        try:
            with torch.no_grad():
                was = self.training
                self.eval()
                self(torch.zeros(1, *input_shape, device=device_of(self.model)))
                self.train(was)
        finally:
            for hook in hooks:
                hook.remove()
        return sum(count_parameters(module) for module in ran) + count_parameters(self.head)


# -- the scheme's `exits` mode ----------------------------------------------------------------------
def run_exits(run: SchemeRun) -> dict:
    """`scheme: self` with `self_distill.mode: exits`: the student trained with exits, beside its baseline."""
    cfg = run.cfg
    section = cfg.self_distill
    with run.pipeline(run.part_config("scratch", {}), trains=("baseline",)) as scratch:
        model = scratch.build("student").to(scratch.device)  # seeded: it starts as its baseline did
        distiller = SelfDistiller(model, list(section.exits), deepest=section.deepest, alpha=section.alpha,
                                  temperature=section.temperature, feature_weight=section.feature_weight)
        scratch.model("baseline")
        folder = run.folder / "exits"
        trained = run.train_in_folder(distiller, scratch, folder, "exits")
    exits = distiller.exit_models()
    shape = scratch.data.input_shape
    entrants: dict[str, Entrant] = {}
    entrants["student"] = Entrant(distiller.student.eval(), folder / MODEL_FILE, {
        "model": cfg.student.name, "title": "deepest exit (the student, exits left out)", **trained})
    for number, (path, exit_model) in enumerate(exits.items(), start=1):
        entrants[f"exit{number}"] = Entrant(exit_model.eval(), None, {
            "model": f"{cfg.student.name} to {path} + head", "title": f"exit {number} ({path})",
            "params": exit_model.used_parameters(shape), **trained})
    entrants["baseline"] = scratch.entrant("baseline", "student from scratch")
    return run.compare(entrants, scratch, histories={
        "student with exits (its objective)": folder / "metrics.jsonl",
        "student from scratch": scratch.role_dir("baseline") / "metrics.jsonl"},
        notes=["Each exit runs the network only up to its tap: its latency and parameters are what early exit "
               "costs. The exported student is the network alone; the exits' heads are in "
               "exits/objective.safetensors."])
