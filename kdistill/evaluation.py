"""What a deployed model is judged on: accuracy, NLL, agreement with the teacher, size, speed."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.utils.benchmark import Timer

from kdistill.models import count_parameters
from kdistill.train import evaluate

WARMUP_CALLS = 3
# A teacher's lead over the baseline counts only beyond this many standard deviations of the
# paired (McNemar) noise: below it, the gap recovered is a ratio of noise.
GAP_SIGMAS = 2.0


@torch.inference_mode()
def latency_ms(models: Mapping[str, nn.Module], input_shape: Sequence[int], batch_sizes: Sequence[int],
               repeats: int = 30) -> dict[str, dict[str, float]]:
    """Median wall time of one forward pass per model and batch size, in milliseconds.

    The models are timed in interleaved rounds (each round times every model once, starting
    with a different model each round), so a slow moment of the machine, a warming cache or
    a frequency change weighs on all of them alike: timing one model after another made two
    identical models differ by 25-50 %. Inputs live where each model's weights live.
    """
    modes = {name: model.training for name, model in models.items()}
    names = list(models)
    result: dict[str, dict[str, float]] = {name: {} for name in names}
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
            for name in names:
                timers[name][i].timeit(WARMUP_CALLS)
            times: dict[str, list[float]] = {name: [] for name in names}
            for round_ in range(repeats):
                for k in range(len(names)):
                    name = names[(round_ + k) % len(names)]
                    times[name].append(timers[name][i].timeit(1).median)
            for name in names:
                result[name][f"batch_{batch}"] = 1000 * statistics.median(times[name])
    finally:
        for name, model in models.items():
            model.train(modes[name])
    return result


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
    metrics = {
        "test_accuracy": result.accuracy,
        "test_nll": result.nll,
        "agreement": agreement,
        "params": count_parameters(model),
        "checkpoint_bytes": checkpoint.stat().st_size if checkpoint and checkpoint.exists() else None,
    }
    return TestResult(metrics, predictions, predictions == result.labels)


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
