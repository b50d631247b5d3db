"""Student test accuracy against the share of labelled training data, with and without the teacher's
soft labels on the rest: a table (Markdown, stdout) and a plot.

Reads run and sweep folders (as `kdistill report` does): each run's `data.labelled_fraction`, and its
teacher (trained on the labelled part only), student from scratch (the labelled part only) and
distilled student (the labelled part, and the teacher's soft labels on the unlabelled rest).

    python benchmarks/labelled_fraction.py runs/schemes_labelled runs/methods_kd \\
        --out benchmarks/results/labelled_fraction.png
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from kdistill.study import find_runs

SERIES = (("teacher", "teacher (labelled part)"), ("baseline", "student from scratch (labelled part)"),
          ("student", "student + teacher's soft labels on the rest"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--out", default="benchmarks/results/labelled_fraction.png")
    args = parser.parse_args()
    points: dict[float, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in find_runs(args.folders):
        fraction = run.config.get("data.labelled_fraction", 1.0)
        for role, _ in SERIES:
            value = run.figure(f"{role}.test_accuracy")
            if value is not None:
                points[fraction][role].append(value)
    fractions = sorted(points)
    print("| labelled | " + " | ".join(title for _, title in SERIES) + " | seeds |")
    print("| --- | " + " | ".join("---" for _ in SERIES) + " | --- |")
    for fraction in fractions:
        cells = []
        for role, _ in SERIES:
            values = points[fraction][role]
            cells.append(f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f} %"
                         if len(values) > 1 else f"{100 * values[0]:.2f} %" if values else "–")
        print(f"| {100 * fraction:g} % | " + " | ".join(cells) + f" | {len(points[fraction]['student'])} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for role, title in SERIES:
        xs = [100 * f for f in fractions if points[f][role]]
        means = [100 * statistics.mean(points[f][role]) for f in fractions if points[f][role]]
        sds = [100 * statistics.stdev(points[f][role]) if len(points[f][role]) > 1 else 0.0
               for f in fractions if points[f][role]]
        ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=title)
    ax.set_xscale("log")
    ax.set(xlabel="labelled share of the training split (%)", ylabel="test accuracy (%)",
           title="Fashion-MNIST: learning from unlabelled data through the teacher")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
