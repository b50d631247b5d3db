"""The `kdistill` command: a thin layer over kdistill.pipeline.

Bad input of any kind ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from kdistill.errors import KdistillError

EXIT_BAD_INPUT = 2


def _recipe_command(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. distill.temperature=8")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted training in the run folder")
    parser.add_argument("--force", action="store_true", help="delete the run folder and start over")
    parser.add_argument("--quiet", action="store_true", help="print nothing but the result")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdistill", description="Knowledge distillation for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _recipe_command(sub, "run", "train the teacher, the baseline and the distilled student; evaluate; report")
    train = _recipe_command(sub, "train", "train (or load) the teacher, or the baseline student with --baseline")
    train.add_argument("--baseline", action="store_true", help="train the student from scratch (cross-entropy only)")
    _recipe_command(sub, "distill", "distill the student from the run's teacher")
    _recipe_command(sub, "soft-labels", "compute the teacher's soft labels for the training set and cache them")
    _recipe_command(sub, "eval", "evaluate the run's models on the test set; writes metrics.json")
    _recipe_command(sub, "report", "write report.md and curves.png from the run's metrics.json")
    listing = sub.add_parser("list", help="list registered datasets, models or losses")
    listing.add_argument("kind", nargs="?", choices=("datasets", "models", "losses"), default=None)
    return parser


def _list(kind: str | None) -> None:
    from kdistill.data import DATASETS
    from kdistill.losses import LOSSES
    from kdistill.models import MODELS

    registries = {"datasets": DATASETS, "models": MODELS, "losses": LOSSES}
    for name in [kind] if kind else list(registries):
        if not kind:
            print(f"{name}:")
        entries = registries[name]
        width = max(len(n) for n in entries)
        for entry, info in entries.items():
            print(f"{'  ' if not kind else ''}{entry:<{width}}  {info.description}")


def _run(args) -> None:
    from kdistill.config import load_config
    from kdistill.pipeline import Pipeline

    cfg = load_config(args.recipe, args.overrides)
    pipeline = Pipeline(cfg, resume=args.resume, force=args.force, progress="quiet" if args.quiet else "auto")
    command = args.command
    if command == "run":
        metrics = pipeline.run()
        print(pipeline.report(metrics))
        gap = metrics.get("gap_recovered")
        print(f"\ngap recovered: {'n/a' if gap is None else f'{gap:.3f}'}; report: {pipeline.run_dir / 'report.md'}")
    elif command == "train":
        role = "baseline" if args.baseline else "teacher"
        pipeline.model(role)
        print(f"{role}: {pipeline.run_dir / role}")
    elif command == "distill":
        if not pipeline.available("teacher"):
            raise KdistillError(f"no trained teacher in {pipeline.run_dir}: run `kdistill train` with the same "
                                "recipe first, or set teacher.checkpoint")
        pipeline.model("student")
        print(f"student: {pipeline.run_dir / 'student'}")
    elif command == "soft-labels":
        if pipeline.teacher_signal == "live":
            print("note: this recipe's student gets a live teacher (augmented inputs or tapped features); "
                  "the cache built here serves unaugmented runs", file=sys.stderr)
        logits, path, built, seconds = pipeline.soft_labels()
        size = path.stat().st_size
        print(f"{'built' if built else 'already cached'}: {path} ({logits.shape[0]} x {logits.shape[1]} logits, "
              f"{size / 1024:.0f} KiB, {seconds:.1f}s)")
    elif command == "eval":
        print(pipeline.report(pipeline.evaluate()))
    elif command == "report":
        print(pipeline.report())
        print(f"\nreport: {pipeline.run_dir / 'report.md'}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after flags (`run r.yaml --quiet a=1`), which argparse won't interleave.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides += extra
    try:
        if args.command == "list":
            _list(args.kind)
        else:
            _run(args)
    except KdistillError as err:
        print(f"kdistill: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FloatingPointError as err:
        print(f"kdistill: training diverged: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nkdistill: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
