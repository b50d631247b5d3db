"""Latency as deployed: PyTorch modules and onnxruntime sessions timed side by side.

Median and 90th percentile of single calls, after warm-up, in interleaved rounds (every model once
per round, in a rotating order, so a slow moment of the machine weighs on all alike), at each batch
size, with the same thread count for both runtimes, which the result records.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.benchmark import Timer

from kdistill.evaluation import interleaved_times, machine_load


@torch.inference_mode()
def deployment_latency(runners: Mapping[str, object], input_shape: Sequence[int], batch_sizes: Sequence[int],
                       repeats: int, threads: int) -> dict:
    """{name: {"batch_B": {"median_ms", "p90_ms"}}} for nn.Modules (run on the CPU in eval mode) and
    onnxruntime sessions (made with `threads` intra-op threads), plus "threads" and the machine's load."""
    result: dict = {name: {} for name in runners}
    for module in runners.values():
        if isinstance(module, nn.Module):
            module.eval()
    load = machine_load()
    for batch in batch_sizes:
        x = torch.randn(batch, *input_shape, device="cpu")
        timers = {name: _timer(runner, x, threads) for name, runner in runners.items()}
        for name, times in interleaved_times(timers, repeats).items():
            result[name][f"batch_{batch}"] = {"median_ms": 1000 * statistics.median(times),
                                              "p90_ms": 1000 * statistics.quantiles(times, n=10)[8]}
    return {"models": result, "threads": threads, "repeats": repeats, "machine": load}


def _timer(runner, x: torch.Tensor, threads: int) -> Timer:
    if isinstance(runner, nn.Module):
        return Timer("model(x)", globals={"model": runner, "x": x}, num_threads=threads)
    feed = {runner.get_inputs()[0].name: x.numpy()}
    return Timer("session.run(None, feed)", globals={"session": runner, "feed": feed}, num_threads=threads)
