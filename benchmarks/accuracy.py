"""Accuracy over seeds: teacher, baseline (student from scratch) and distilled student of a recipe.

Each seed is a full `kdistill run` (own run folder, same recipe, `seed=<s>`). With
--shared-teacher the teacher is trained once (first seed) and loaded by the other seeds, so
the spread is the students' alone. Prints mean and standard deviation of test accuracy and the
gap recovered, and writes the per-seed metrics to benchmarks/results/<recipe>.json.

    python benchmarks/accuracy.py recipes/seed_fashion_mnist.yaml --seeds 0 1 2
    python benchmarks/accuracy.py recipes/fashion_mnist_resnet.yaml --seeds 0 1 2 --shared-teacher
    python benchmarks/accuracy.py RECIPE --teacher-checkpoint runs/x/teacher/model.safetensors
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from kdistill.config import load_config
from kdistill.pipeline import Pipeline

ROLES = ("teacher", "baseline", "student")


def summarize(values: list[float]) -> str:
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * spread:.2f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shared-teacher", action="store_true")
    parser.add_argument("--teacher-checkpoint", default=None,
                        help="use this trained teacher for every seed (implies --shared-teacher)")
    parser.add_argument("--out-dir", default="runs/benchmarks")
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args()

    per_seed = {}
    teacher_checkpoint = args.teacher_checkpoint
    args.shared_teacher = args.shared_teacher or teacher_checkpoint is not None
    for seed in args.seeds:
        base = load_config(args.recipe, args.overrides)
        overrides = [*args.overrides, f"seed={seed}", f"name={base.name}_seed{seed}", f"out_dir={args.out_dir}"]
        if teacher_checkpoint:
            overrides.append(f"teacher.checkpoint={teacher_checkpoint}")
        with Pipeline(load_config(args.recipe, overrides), resume=True) as pipeline:
            metrics = pipeline.run()
        per_seed[seed] = metrics
        if args.shared_teacher and teacher_checkpoint is None:
            teacher_checkpoint = pipeline.role_dir("teacher") / "model.safetensors"
        print(f"seed {seed}: " + ", ".join(f"{r} {100 * metrics[r]['test_accuracy']:.2f} %" for r in ROLES), flush=True)

    print(f"\n{args.recipe} {' '.join(args.overrides)} seeds {args.seeds}"
          f"{' (one teacher for every seed)' if args.shared_teacher else ''}")
    for role in ROLES:
        print(f"  {role:<9} test accuracy {summarize([m[role]['test_accuracy'] for m in per_seed.values()])}")
    means = {role: statistics.mean(m[role]["test_accuracy"] for m in per_seed.values()) for role in ROLES}
    lead = means["teacher"] - means["baseline"]
    gap = (means["student"] - means["baseline"]) / lead if lead > 0 else None
    gap_text = "n/a: the teacher is not better than the baseline" if gap is None else f"{gap:.3f}"
    print(f"  gap recovered (of the means): {gap_text}")
    overheads = [m["distill_overhead"] for m in per_seed.values() if m.get("distill_overhead")]
    if overheads:
        print(f"  distillation epoch / baseline epoch: median {statistics.median(overheads):.3f}")
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.recipe).stem + ("_" + "_".join(args.overrides) if args.overrides else "")
    (out / f"{name}.json").write_text(json.dumps({"recipe": args.recipe, "overrides": args.overrides,
                                                  "shared_teacher": args.shared_teacher,
                                                  "per_seed": per_seed}, indent=2))


if __name__ == "__main__":
    main()
