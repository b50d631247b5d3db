"""Distillation settings side by side: one recipe, one teacher, several sets of overrides.

Each variant is a full run (its own folder). Variants that change only `distill.*` keys reuse
the first run's baseline (the same student, data, seed and schedule give the same weights),
so a sweep costs one baseline plus one student per variant. Choose by validation accuracy;
the test column is shown for the record.

    python -m benchmarks.sweep recipes/fashion_mnist_resnet.yaml --teacher-checkpoint T.safetensors \\
        --variant "distill.temperature=2" --variant "distill.temperature=8"
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from kdistill.config import load_config
from kdistill.pipeline import Pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--teacher-checkpoint", required=True)
    parser.add_argument("--variant", action="append", default=[], help="space-separated key=value overrides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="runs/sweeps")
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args()

    rows, first_baseline = [], None
    for number, variant in enumerate(["", *args.variant]):
        overrides = variant.split()
        name = f"{Path(args.recipe).stem}_sweep{number}"
        cfg = load_config(args.recipe, [*overrides, f"seed={args.seed}", f"name={name}", f"out_dir={args.out_dir}",
                                        f"teacher.checkpoint={args.teacher_checkpoint}"])
        run_dir = Path(args.out_dir) / name
        only_distill = all(o.startswith("distill.") for o in overrides)
        with Pipeline(cfg, resume=True, progress="quiet") as pipeline:
            if first_baseline is not None and only_distill and not (run_dir / "baseline").exists():
                shutil.copytree(first_baseline, run_dir / "baseline")  # same student and training: reuse it
            metrics = pipeline.run()
        if first_baseline is None:
            first_baseline = run_dir / "baseline"
        rows.append({"variant": variant or "(recipe)", "student_val": metrics["student"]["val_accuracy"],
                     "student_test": metrics["student"]["test_accuracy"],
                     "baseline_test": metrics["baseline"]["test_accuracy"],
                     "teacher_test": metrics["teacher"]["test_accuracy"],
                     "gap_recovered": metrics.get("gap_recovered"),
                     "distill_overhead": metrics.get("distill_overhead"),
                     "teacher_signal": metrics.get("teacher_signal")})
        print(json.dumps(rows[-1]), flush=True)

    print("\n| variant | student val | student test | gap recovered | epoch time / baseline | teacher |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        gap = "–" if row["gap_recovered"] is None else f"{row['gap_recovered']:.3f}"
        print(f"| `{row['variant']}` | {100 * row['student_val']:.2f} % | {100 * row['student_test']:.2f} % | {gap} "
              f"| {row['distill_overhead']:.2f} | {row['teacher_signal']} |")
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / f"sweep_{Path(args.recipe).stem}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
