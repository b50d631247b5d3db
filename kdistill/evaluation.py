"""What a deployed model is judged on: accuracy, NLL, agreement with the teacher, size, speed."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from kdistill.models import count_parameters
from kdistill.train import evaluate


@torch.inference_mode()
def latency_ms(model: nn.Module, input_shape: Sequence[int], batch_size: int, repeats: int = 30) -> float:
    """Median wall time of one forward pass on the CPU, in milliseconds (after warm-up)."""
    was_training = model.training
    model.eval()
    inputs = torch.randn(batch_size, *input_shape)
    for _ in range(3):
        model(inputs)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(inputs)
        times.append(time.perf_counter() - started)
    model.train(was_training)
    return 1000 * statistics.median(times)


def model_metrics(model: nn.Module, test_loader, *, input_shape: Sequence[int],
                  teacher_predictions: Tensor | None, checkpoint: Path | None,
                  latency_batches: Sequence[int] = (1, 256), latency_repeats: int = 30,
                  precision: str = "fp32") -> tuple[dict, Tensor]:
    """Test-set metrics of one model; returns (metrics, its test predictions)."""
    result = evaluate(model, test_loader, precision)
    predictions = result.logits.argmax(1)
    agreement = 1.0 if teacher_predictions is None else (predictions == teacher_predictions).float().mean().item()
    metrics = {
        "test_accuracy": result.accuracy,
        "test_nll": result.nll,
        "agreement": agreement,
        "params": count_parameters(model),
        "checkpoint_bytes": checkpoint.stat().st_size if checkpoint and checkpoint.exists() else None,
        "latency_ms": {
            f"batch_{b}": latency_ms(model, input_shape, b, latency_repeats)
            for b in latency_batches
        },
    }
    return metrics, predictions


def gap_recovered(teacher: float, baseline: float, student: float) -> float | None:
    """(student - baseline) / (teacher - baseline): 1 = all of the teacher's lead kept.

    None when the teacher is not better than the baseline: there is no gap to recover.
    """
    if teacher <= baseline:
        return None
    return (student - baseline) / (teacher - baseline)
