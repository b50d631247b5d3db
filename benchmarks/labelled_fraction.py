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


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.2f} %"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--out", default="benchmarks/results/labelled_fraction.png")
    args = parser.parse_args()
    # Keyed by (labelled fraction, the teacher's epochs): a small labelled part may need a longer teacher.
    points: dict[tuple[float, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in find_runs(args.folders):
        key = (run.config.get("data.labelled_fraction", 1.0), run.config.get("teacher.train.epochs"))
        for role, _ in SERIES:
            value = run.figure(f"{role}.test_accuracy")
            if value is not None:
                points[key][role].append(value)
    keys = sorted(points)
    print("| labelled | teacher epochs | " + " | ".join(title for _, title in SERIES) + " | seeds |")
    print("| --- | --- | " + " | ".join("---" for _ in SERIES) + " | --- |")
    for key in keys:
        cells = [_mean_sd(points[key][role]) for role, _ in SERIES]
        print(f"| {100 * key[0]:g} % | {key[1]} | " + " | ".join(cells) + f" | {len(points[key]['student'])} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = sorted({epochs for _, epochs in keys}, key=str)
    for role, title in SERIES:
        for epochs in budgets if role != "baseline" else [None]:
            chosen = [k for k in keys if epochs is None or k[1] == epochs]
            if role == "baseline":  # the same from-scratch student whatever the teacher: one point per fraction
                chosen = list({k[0]: k for k in chosen}.values())
            chosen = [k for k in chosen if points[k][role]]
            if not chosen:
                continue
            label = title if epochs is None or len(budgets) == 1 else f"{title}, teacher {epochs} epochs"
            ax.errorbar([100 * k[0] for k in chosen], [100 * statistics.mean(points[k][role]) for k in chosen],
                        yerr=[100 * statistics.stdev(points[k][role]) if len(points[k][role]) > 1 else 0.0
                              for k in chosen], marker="o", capsize=3, label=label)
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
