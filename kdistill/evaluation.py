"""What a deployed model is judged on: accuracy, NLL, agreement with the teacher, size, speed."""

from __future__ import annotations

import copy
import math
import os
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.utils.benchmark import Timer

from kdistill.models import count_parameters
from kdistill.storage import file_digest
from kdistill.train import evaluate
from kdistill.train.devices import device_name

WARMUP_CALLS = 3
# A teacher's lead over the baseline counts only beyond this many standard deviations of the
# paired (McNemar) noise: below it, the gap recovered is a ratio of noise.
GAP_SIGMAS = 2.0
BUSY_SPREAD = 0.15  # interquartile range over the median beyond which a latency is called noisy
BUSY_LOAD = 1.5  # load average per CPU beyond which other work competed with the timing


class Latency(NamedTuple):
    """Per model, per batch key ("batch_1", ...): the median forward time in ms, and its spread
    (interquartile range over the median: 0.05 = the middle half of the rounds lie within 5 %)."""

    median: dict[str, dict[str, float]]
    spread: dict[str, dict[str, float]]


@torch.inference_mode()
def latency_ms(models: Mapping[str, nn.Module], input_shape: Sequence[int], batch_sizes: Sequence[int],
               repeats: int = 30) -> Latency:
    """Median wall time of one forward pass per model and batch size, in milliseconds, with its spread.

    The models are timed in interleaved rounds (each round times every model once, starting
    with a different model each round), so a slow moment of the machine, a warming cache or
    a frequency change weighs on all of them alike: timing one model after another made two
    identical models differ by 25-50 %. Inputs live where each model's weights live.
    """
    modes = {name: model.training for name, model in models.items()}
    names = list(models)
    result = Latency({name: {} for name in names}, {name: {} for name in names})
    try:
        timers = {}
        for name, model in models.items():
            model.eval()
            first = next(model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
            timers[name] = [Timer("model(x)", globals={"model": model,
                                                       "x": torch.randn(b, *input_shape, device=device)},
                                  num_threads=torch.get_num_threads()) for b in batch_sizes]
        for i, batch in enumerate(batch_sizes):
            times = interleaved_times({name: timers[name][i] for name in names}, repeats)
            for name in names:
                median = statistics.median(times[name])
                result.median[name][f"batch_{batch}"] = 1000 * median
                result.spread[name][f"batch_{batch}"] = _interquartile_range(times[name]) / median
    finally:
        for name, model in models.items():
            model.train(modes[name])
    return result


def interleaved_times(timers: Mapping[str, Timer], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each timer over `repeats` rounds, after WARMUP_CALLS calls each. Each round
    times every timer once, starting with a different one each round (see `latency_ms`)."""
    names = list(timers)
    for name in names:
        timers[name].timeit(WARMUP_CALLS)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for k in range(len(names)):
            name = names[(round_ + k) % len(names)]
            times[name].append(timers[name].timeit(1).median)
    return times


def _interquartile_range(values: Sequence[float]) -> float:
    if len(values) < 4:
        return max(values) - min(values)
    quartiles = statistics.quantiles(values, n=4)
    return quartiles[2] - quartiles[0]


def machine_load() -> dict:
    """The 1-minute load average and the CPU count, to tell timings on a busy machine apart."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this system
        load = None
    return {"load_average": load, "cpus": os.cpu_count()}


def busy_latency_note(metrics: dict) -> str | None:
    """A sentence when the latencies in `metrics` were measured on a loaded machine, else None.

    Loaded: the middle half of the rounds spread over more than BUSY_SPREAD of the median for
    some model, or other work kept the load average above BUSY_LOAD x the CPU count.
    """
    spreads = [spread for role in metrics.values() if isinstance(role, dict)
               for spread in role.get("latency_spread", {}).values()]
    machine = metrics.get("latency_machine") or {}
    load, cpus = machine.get("load_average"), machine.get("cpus")
    loaded = load is not None and cpus and load > BUSY_LOAD * cpus
    if not spreads or not (max(spreads) > BUSY_SPREAD or loaded):
        return None
    where = f"load average {load:.1f} on {cpus} CPUs, " if load is not None and cpus else ""
    return (f"latency measured on a busy machine ({where}rounds spread up to {100 * max(spreads):.0f} % of the "
            "median): the CPU figures are rough; time again on a quiet machine to compare them")


class Entrant(NamedTuple):
    """A model to compare: its weights' file (None for one assembled in memory, like an ensemble) and what
    its row says besides the measured figures (architecture, training time, a title)."""

    model: nn.Module
    checkpoint: Path | None
    info: dict


def compare_models(entrants: Mapping[str, Entrant], test_loader, val_loader, data, eval_cfg,
                   device: torch.device) -> tuple[dict, dict[str, Tensor]]:
    """Every model measured once on the test set, side by side: (metrics, each model's [N] correct mask).

    metrics holds the data's summary, one row per model (in the order given; agreement is with the
    first), and the latency of all of them, timed in interleaved rounds on the CPU (and on the GPU
    when they live there). The validation accuracy is of the selected weights, for reference.
    """
    metrics: dict = {"data": data.summary()}
    correct = {}
    reference = None
    for label, (model, checkpoint, info) in entrants.items():
        result = model_metrics(model, test_loader, teacher_predictions=reference, checkpoint=checkpoint)
        if checkpoint is not None:
            result.metrics["checkpoint_sha256"] = file_digest(checkpoint)
        if reference is None:
            reference = result.predictions
        correct[label] = result.correct
        metrics[label] = {"model": info.get("model", type(model).__name__),
                          "val_accuracy": evaluate(model, val_loader).accuracy, **result.metrics,
                          **{k: v for k, v in info.items() if k != "model"}}
    batches = list(eval_cfg.latency_batches)
    models = {label: entrant.model for label, entrant in entrants.items()}
    # On the CPU (what a small deployment runs on) always; on the training GPU as well.
    on_cpu = {label: copy.deepcopy(model).cpu() for label, model in models.items()} \
        if device.type != "cpu" else models
    metrics["latency_machine"] = machine_load()  # before timing: the load of what ran meanwhile
    timings = latency_ms(on_cpu, data.input_shape, batches, eval_cfg.latency_repeats)
    for label in models:
        metrics[label]["latency_ms"] = timings.median[label]
        metrics[label]["latency_spread"] = timings.spread[label]
    metrics["latency_device"] = "cpu"
    if device.type != "cpu":
        timings = latency_ms(models, data.input_shape, batches, eval_cfg.latency_repeats)
        for label in models:
            metrics[label]["gpu_latency_ms"] = timings.median[label]
        metrics["gpu_latency_device"] = device_name(device)
    return metrics, correct


class TestResult(NamedTuple):
    metrics: dict
    predictions: Tensor  # [N] predicted class per test sample
    correct: Tensor  # [N] bool


def model_metrics(model: nn.Module, test_loader, *, teacher_predictions: Tensor | None,
                  checkpoint: Path | None, precision: str = "fp32") -> TestResult:
    """Test-set metrics of one model (everything but latency, which `latency_ms` measures for all at once)."""
    result = evaluate(model, test_loader, precision)
    predictions = result.logits.argmax(1)
    agreement = 1.0 if teacher_predictions is None else (predictions == teacher_predictions).float().mean().item()
    correct = predictions == result.labels
    classes = int(result.logits.shape[1])
    per_class = torch.zeros(classes, dtype=torch.float64).index_add_(0, result.labels, correct.double())
    counts = torch.bincount(result.labels, minlength=classes).double()
    metrics = {
        "test_accuracy": result.accuracy,
        "class_accuracy": [None if n == 0 else hit / n  # None: a class absent from the test set
                           for hit, n in zip(per_class.tolist(), counts.tolist(), strict=True)],
        "test_nll": result.nll,
        "agreement": agreement,
        "params": count_parameters(model),
        "checkpoint_bytes": checkpoint.stat().st_size if checkpoint and checkpoint.exists() else None,
    }
    return TestResult(metrics, predictions, correct)


def gap_recovered(teacher_correct: Tensor, baseline_correct: Tensor,
                  student_correct: Tensor) -> tuple[float | None, str]:
    """(student - baseline) / (teacher - baseline) in test accuracy, and a note saying why when undefined.

    1 = all of the teacher's lead kept. The ratio is only defined when the teacher's lead over
    the baseline is clearly larger than the noise: the two are judged on the same test images,
    so the noise of their difference is the paired (McNemar) one, sqrt(b + c) images, where b
    and c count the images only one of the two gets right. Otherwise a lead of a few images
    makes the ratio explode (a lead of 6 images of 10,000 once gave 13.5).
    """
    n = teacher_correct.numel()
    teacher_only = int((teacher_correct & ~baseline_correct).sum())
    baseline_only = int((baseline_correct & ~teacher_correct).sum())
    lead = teacher_only - baseline_only
    noise = GAP_SIGMAS * math.sqrt(teacher_only + baseline_only)
    if lead <= 0:
        return None, f"undefined: the teacher is not ahead of the baseline ({lead:+d} of {n:,} test images)"
    if lead <= noise:
        return None, (f"undefined: the teacher leads the baseline by {lead} of {n:,} test images, "
                      f"within the noise of the comparison ({GAP_SIGMAS:g} sigma = {noise:.0f} images)")
    student_lead = int(student_correct.sum()) - int(baseline_correct.sum())
    return student_lead / lead, f"the teacher leads the baseline by {lead} of {n:,} test images"
