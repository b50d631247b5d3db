"""What compression bought: the table of every model and runtime, the accuracy-latency and accuracy-size
frontiers, and the headline (the fastest model keeping 99 % of the teacher's accuracy, chosen on the validation
split)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from kdistill.storage import atomic_write, atomic_write_text

RUNTIMES = ("pytorch", "onnxruntime")
ACCURACY_KEPT = 0.99  # the headline: the fastest model within 1 % (relative) of the teacher's accuracy


class Point(NamedTuple):
    """One model in one runtime."""

    name: str
    runtime: str
    accuracy: float  # test
    val_accuracy: float | None
    latency_ms: float | None  # median at batch 1
    bytes: int | None  # the file that runtime loads
    figures: dict  # the model's row


def points(metrics: dict) -> list[Point]:
    result = []
    for name in metrics["rows"]:
        row = metrics["models"][name]
        for runtime in RUNTIMES:
            figures = row["runtimes"].get(runtime)
            if figures is None:
                continue
            latency = figures.get("latency_ms", {}).get("batch_1", {}).get("median_ms")
            size = row["bytes"].get("safetensors" if runtime == "pytorch" else "onnx")
            result.append(Point(name, runtime, figures["test_accuracy"], figures.get("val_accuracy"), latency, size,
                                row))
    return result


def frontier(candidates: list[Point], cost) -> list[Point]:
    """The points no other beats on both accuracy and `cost` (lower is better), cheapest first."""
    ordered = sorted((p for p in candidates if cost(p) is not None), key=lambda p: (cost(p), -p.accuracy))
    kept, best = [], -1.0
    for point in ordered:
        if point.accuracy > best:
            kept.append(point)
            best = point.accuracy
    return kept


def headline(metrics: dict) -> str | None:
    """The fastest model (batch 1, onnxruntime when exported) whose validation accuracy is within ACCURACY_KEPT
    of the teacher's; its test accuracy against the teacher's is what the line reports."""
    all_points = points(metrics)
    teacher = {p.runtime: p for p in all_points if p.name == "teacher"}
    runtime = "onnxruntime" if "onnxruntime" in teacher else "pytorch"
    if runtime not in teacher or teacher[runtime].latency_ms is None or teacher[runtime].val_accuracy is None:
        return None
    reference = teacher[runtime]
    floor = ACCURACY_KEPT * reference.val_accuracy
    keeping = [p for p in all_points if p.runtime == runtime and p.latency_ms and (p.val_accuracy or 0) >= floor]
    best = min(keeping, key=lambda p: (p.latency_ms, p.bytes or 0))  # the teacher itself is always there
    kept = best.accuracy / reference.accuracy
    size = f", {reference.bytes / best.bytes:.1f}x smaller on disk" if best.bytes and reference.bytes else ""
    return (f"Fastest model keeping {100 * ACCURACY_KEPT:g} % of the teacher's accuracy (chosen on the validation "
            f"split) in {runtime}: `{best.name}`, test {100 * best.accuracy:.2f} % against the teacher's "
            f"{100 * reference.accuracy:.2f} % ({100 * kept:.1f} % of it), {best.latency_ms:.3f} ms at batch 1 "
            f"against {reference.latency_ms:.3f} ms ({reference.latency_ms / best.latency_ms:.1f}x faster){size}.")


def compression_table(metrics: dict) -> str:
    header = ["model", "runtime", "val acc", "test acc", "params", "nonzero", "MACs", "file",
              *[f"b{b} median / p90 (ms)" for b in _batches(metrics)]]
    rows = [header, ["---"] * len(header)]
    for p in points(metrics):
        row = p.figures
        latency = row["runtimes"][p.runtime].get("latency_ms", {})
        rows.append([p.name, p.runtime, "–" if p.val_accuracy is None else f"{100 * p.val_accuracy:.2f} %",
                     f"{100 * p.accuracy:.2f} %", f"{row['params']:,}",
                     f"{row['nonzero_params']:,}", f"{row['macs']:,}",
                     "–" if p.bytes is None else f"{p.bytes / 1024:,.0f} KiB",
                     *[_latency(latency.get(f"batch_{b}")) for b in _batches(metrics)]])
    return "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in rows)


def write_compression_report(folder: Path, metrics: dict) -> None:
    lines = ["# Compressed models", "", compression_table(metrics), ""]
    if (line := headline(metrics)) is not None:
        lines += [line, ""]
    lines += [f"Latency: median and 90th percentile of {metrics['latency_repeats']} timed calls after warm-up, every "
              f"model and runtime timed in interleaved rounds, {metrics['threads']} threads in both runtimes. "
              "MACs: multiply-accumulates per sample of the Conv and Linear layers (dense: zeroed weights still "
              "run). File: what the runtime loads (safetensors for PyTorch, ONNX for onnxruntime).", "",
              "![frontier](frontier.png)", ""]
    atomic_write_text(folder / "report.md", "\n".join(lines))
    write_frontier_plot(folder / "frontier.png", metrics)


def write_frontier_plot(path: Path, metrics: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_points = points(metrics)
    figure, axes = plt.subplots(1, 2, figsize=(13, 5))
    for axis, cost, label in ((axes[0], lambda p: p.latency_ms, "CPU latency at batch 1 (ms, median)"),
                              (axes[1], lambda p: p.bytes / 1024 if p.bytes else None, "file size (KiB)")):
        for runtime, marker in zip(RUNTIMES, "os", strict=True):
            chosen = [p for p in all_points if p.runtime == runtime and cost(p) is not None]
            axis.scatter([cost(p) for p in chosen], [100 * p.accuracy for p in chosen], marker=marker, label=runtime)
            for p in chosen:
                axis.annotate(p.name, (cost(p), 100 * p.accuracy), fontsize=7, xytext=(3, 3),
                              textcoords="offset points")
        edge = frontier(all_points, cost)
        axis.plot([cost(p) for p in edge], [100 * p.accuracy for p in edge], "k--", linewidth=1, label="frontier")
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("test accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)


def _batches(metrics: dict) -> list[int]:
    keys = {key for row in metrics["models"].values() for runtime in row["runtimes"].values()
            for key in runtime.get("latency_ms", {})}
    return sorted(int(key.split("_")[1]) for key in keys)


def _latency(figures: dict | None) -> str:
    return "–" if not figures else f"{figures['median_ms']:.3f} / {figures['p90_ms']:.3f}"
