"""Shared by the benchmarks: A/B timing in one process, interleaved, reported as medians."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch


def check_environment() -> str:
    """One line describing what the numbers were measured under."""
    malloc = os.environ.get("MALLOC_MMAP_THRESHOLD_") and os.environ.get("MALLOC_TRIM_THRESHOLD_")
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} CPUs, malloc thresholds {'set' if malloc else 'NOT set (run via make bench-*)'}")


def interleaved(variants: dict[str, Callable[[], float | None]], rounds: int) -> dict[str, list[float]]:
    """Run each variant once per round, in turn, so load changes hit all of them alike.

    A variant returns its own measured seconds, or None to be timed as a whole.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            started = time.perf_counter()
            measured = run()
            times[name].append(measured if measured is not None else time.perf_counter() - started)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)
