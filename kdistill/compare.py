"""`compare`: teacher, baseline and distilled student side by side, from Python, as `kdistill run` prints them.

    result = kdistill.compare(teacher=teacher, baseline=baseline, student=student, test_loader=test_loader,
                              device="cuda")
    print(result)            # the comparison table, then the gap recovered (or why it is undefined)
    result.metrics           # the same dict as a run's metrics.json
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kdistill.errors import KdistillError
from kdistill.evaluation import gap_recovered, latency_ms, machine_load, model_metrics
from kdistill.report import ROLES, comparison_table, result_lines
from kdistill.train.devices import device_name, device_of, resolve_device
from kdistill.train.loop import unpack


@dataclass
class Comparison:
    metrics: dict

    def table(self) -> str:
        return comparison_table(self.metrics)

    def __str__(self) -> str:
        return "\n".join([self.table(), "", *result_lines(self.metrics)])


def compare(*, teacher: nn.Module | None = None, baseline: nn.Module | None = None, student: nn.Module | None = None,
            test_loader: Iterable, device: torch.device | str = "auto", latency_batches: Sequence[int] = (1, 256),
            latency_repeats: int = 30) -> Comparison:
    """Evaluate the models given once on `test_loader` (any iterable of (inputs, labels) batches) on `device`,
    time them on the CPU (and on the GPU when `device` is one), and compare them.

    Agreement is measured against the teacher; the gap recovered needs all three. Each model is
    evaluated on `device` and given back where it was, in the mode it was in.
    """
    models = {role: model for role, model in (("teacher", teacher), ("baseline", baseline), ("student", student))
              if model is not None}
    if not models:
        raise KdistillError("compare needs at least one of teacher=, baseline=, student=")
    for role, model in models.items():
        if not isinstance(model, nn.Module):
            raise KdistillError(f"compare: {role} must be a torch.nn.Module, got {type(model).__name__}")
    target = resolve_device(device)
    first = next(iter(test_loader), None)
    if first is None:
        raise KdistillError("compare: test_loader yields no batches")
    input_shape = tuple(unpack(first)[0].shape[1:])

    metrics: dict = {}
    correct = {}
    teacher_predictions = None
    with _moved(models, target):
        for role in ROLES:  # the teacher first: the others' agreement is with its predictions
            if role not in models:
                continue
            result = model_metrics(models[role], test_loader, teacher_predictions=teacher_predictions,
                                   checkpoint=None)
            if role == "teacher":
                teacher_predictions = result.predictions
            correct[role] = result.correct
            metrics[role] = {"model": type(models[role]).__name__, **result.metrics}
        if target.type != "cpu":
            timings = latency_ms(models, input_shape, latency_batches, latency_repeats)
            for role in models:
                metrics[role]["gpu_latency_ms"] = timings.median[role]
            metrics["gpu_latency_device"] = device_name(target)
    metrics["latency_machine"] = machine_load()
    on_cpu = {role: copy.deepcopy(model).cpu() for role, model in models.items()}
    timings = latency_ms(on_cpu, input_shape, latency_batches, latency_repeats)
    for role in models:
        metrics[role]["latency_ms"] = timings.median[role]
        metrics[role]["latency_spread"] = timings.spread[role]
    metrics["latency_device"] = "cpu"
    if len(correct) == len(ROLES):
        metrics["gap_recovered"], metrics["gap_recovered_note"] = gap_recovered(
            correct["teacher"], correct["baseline"], correct["student"])
    return Comparison(metrics)


@contextlib.contextmanager
def _moved(models: dict[str, nn.Module], target: torch.device):
    """The models on `target` for the block, then back where each was."""
    homes = {role: device_of(model) for role, model in models.items()}
    try:
        for model in models.values():
            model.to(target)
        yield
    finally:
        for role, model in models.items():
            model.to(homes[role])
