"""The `kdistill` command: a thin layer over kdistill.pipeline.

Bad input of any kind ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from kdistill.errors import KdistillError

EXIT_BAD_INPUT = 2  # kdistill.train.distributed.launch relies on it


RECIPE_HELP = """\
RECIPE is a YAML file, or the name of a built-in recipe (`kdistill list recipes`).
`kdistill config RECIPE [key=value ...]` prints every key with its help.

overrides: key=value, the value in YAML (quote an override with spaces or brackets for the shell)
  train.lr=0.05                     set a key
  student.name=mlp                  another model: the recipe's kwargs for the old one are dropped
  student.kwargs.dropout=0.1        set one argument; the model's other kwargs stay
  'student.kwargs={hidden: [800]}'  replace the whole map; works for student.kwargs, teacher.kwargs,
                                    distill.losses and one loss term (other maps merge key by key)
  distill.losses.kd=null            remove a loss term
"""


def _recipe_command(sub, name: str, help_text: str, *, retrains: bool = False) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text, epilog=RECIPE_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # keeps the epilog's table
    parser.add_argument("recipe", help="YAML recipe file, or a built-in recipe's name")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. distill.temperature=8")
    if name == "config":  # it only prints the config
        return parser
    parser.add_argument("--quiet", action="store_true", help="print nothing but the result")
    if name != "check":
        parser.add_argument("--resume", action="store_true", help="continue an interrupted training in the run folder")
    if retrains:  # only commands that train may throw results away
        parser.add_argument("--force", action="store_true",
                            help="retrain what this command makes, and what depends on it (run: everything)")
        parser.add_argument("--nproc", type=int, default=None, metavar="N",
                            help="train in N processes on this machine (DDP, as torchrun --nproc_per_node N does)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdistill", description="Knowledge distillation for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _recipe_command(sub, "run", "train the teacher, the baseline and the distilled student; evaluate; report",
                    retrains=True)
    train = _recipe_command(sub, "train", "train (or load) the teacher, or the baseline student with --baseline",
                            retrains=True)
    train.add_argument("--baseline", action="store_true", help="train the student from scratch (cross-entropy only)")
    _recipe_command(sub, "distill", "distill the student from the run's teacher", retrains=True)
    _recipe_command(sub, "soft-labels", "compute the teacher's soft labels for the training set (and the features "
                                        "the loss terms tap) and cache them")
    _recipe_command(sub, "eval", "evaluate the run's models on the test set; writes metrics.json")
    report = _recipe_command(sub, "report", "write report.md and curves.png from the run's metrics.json; or, given "
                                            "run and sweep folders (kdistill report PATH...), one report over all "
                                            "their runs with tables and plots")
    report.add_argument("--out", default=None, metavar="FOLDER",
                        help="with folders: where report.md and its plots go (default: the one folder given, or "
                             "./kdistill_report)")
    _recipe_command(sub, "check", "check a recipe, its data, models and paths, and say what `run` would do; "
                                  "writes nothing")
    _recipe_command(sub, "config", "print the resolved config, every key with its help (valid YAML: save it as a "
                                   "recipe)")
    sweep = sub.add_parser(
        "sweep", help="run a recipe over a grid of config values and seeds; one results table",
        description="Run RECIPE once per combination of the values given (and per seed), each an ordinary\n"
                    "run folder under <out_dir>/<name>. The teacher is trained once per distinct teacher config\n"
                    "and shared, baselines once per distinct student and training. Finished cells are skipped,\n"
                    "so running the same command again resumes a killed sweep. Writes results.md and .csv.",
        epilog="example: kdistill sweep seed_fashion_mnist distill.temperature=1,4,8 --seeds 0,1,2 --jobs 2\n"
               "a single value (key=v) applies to every cell; commas inside [...] or {...} do not split values",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("recipe", help="YAML recipe file, or a built-in recipe's name")
    sweep.add_argument("overrides", nargs="*", metavar="key=v1,v2,...", help="the grid's axes")
    sweep.add_argument("--seeds", default=None, help="seeds to run every grid point with, e.g. 0,1,2 "
                                                     "(default: the recipe's seed)")
    sweep.add_argument("--jobs", type=int, default=1, metavar="N",
                       help="cells run at once, each with its share of the CPU threads (or its own GPU)")
    sweep.add_argument("--name", default=None, help="the sweep folder's name under out_dir (default: <recipe "
                                                    "name>_sweep)")
    inspect = sub.add_parser(
        "inspect", help="list every module path of a recipe's teacher and student (or of one model) with its output "
                        "shape on one batch and its parameters: the paths that feature losses tap",
        epilog="examples: kdistill inspect demo_fashion_mnist --role student\n"
               "          kdistill inspect resnet width=16 --input-shape 3,32,32 --classes 100",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    inspect.add_argument("target", help="YAML recipe file, a built-in recipe's name, or a registered model's name")
    inspect.add_argument("overrides", nargs="*", metavar="key=value",
                         help="config overrides for a recipe; the model's arguments for a model (width=16)")
    inspect.add_argument("--role", choices=("teacher", "student", "both"), default="both",
                         help="a recipe's model to list (default: both)")
    inspect.add_argument("--input-shape", default="1,28,28", metavar="C,H,W",
                         help="a model: the input's channels, height and width (default 1,28,28)")
    inspect.add_argument("--classes", type=int, default=10, help="a model: its number of classes (default 10)")
    compress = sub.add_parser(
        "compress", help="prune (fine-tuned with distillation), quantise to int8 and export a run's distilled "
                         "student; measure every result beside the teacher and baseline",
        description="Every model made is a deployable folder in RUN_DIR/compressed/ (kdistill predict reads it);\n"
                    "compressed/report.md compares them all (accuracy, size, MACs, latency in PyTorch and\n"
                    "onnxruntime) and compressed/frontier.png plots accuracy against latency and size.",
        epilog="example: kdistill compress runs/fashion_mnist_resnet --prune channels:0.5 --quantize int8\n"
               "key=value overrides set the recipe's compress section, e.g. compress.finetune.epochs=3",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    compress.add_argument("run_dir", help="a run folder with a distilled student (made by kdistill run)")
    compress.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. "
                                                                           "compress.finetune.epochs=3")
    compress.add_argument("--prune", action="append", default=[], metavar="METHOD:SHARE",
                          help="unstructured:S, channels:S or channels_global:S, S in [0, 1); repeat to prune in turn")
    compress.add_argument("--quantize", action="append", default=[], choices=("int8", "static", "dynamic", "qat"),
                          help="int8 in onnxruntime: static (calibrated; int8 means static), dynamic, or qat "
                               "(quantisation-aware training with distillation)")
    compress.add_argument("--export", choices=("onnx",), default=None, help="write and check ONNX files")
    compress.add_argument("--source", choices=("student", "teacher"), default=None,
                          help="what the first pruning starts from (default: the distilled student)")
    compress.add_argument("--teacher", choices=("student", "teacher"), default=None,
                          help="who teaches the fine-tuning after pruning (default: the unpruned student)")
    compress.add_argument("--resume", action="store_true", help="continue an interrupted fine-tuning")
    compress.add_argument("--quiet", action="store_true", help="print nothing but the result")
    predict = sub.add_parser(
        "predict", help="the top classes of images (PNG, JPEG, .npy) by a deployable model folder",
        epilog="example: kdistill predict runs/fashion_mnist_resnet/compressed/student shoe.png --runtime onnxruntime")
    predict.add_argument("model_dir", help="a model folder (model.json + model.safetensors / model.onnx)")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, or .npy arrays of images")
    predict.add_argument("--runtime", choices=("pytorch", "onnxruntime"), default="pytorch")
    predict.add_argument("--top", type=int, default=3, help="classes shown per image (default 3)")
    predict.add_argument("--quiet", action="store_true", help="no notes (resized images), only the predictions")
    listing = sub.add_parser("list", help="list built-in recipes, registered data sets, models or losses")
    listing.add_argument("kind", nargs="?", choices=LISTS, default=None)
    return parser


LISTS = ("recipes", "datasets", "models", "losses", "schemes")


def _list(kind: str | None) -> None:
    from kdistill.config.describe import builtin_recipes, recipe_summary
    from kdistill.data import DATASETS
    from kdistill.losses import LOSSES
    from kdistill.models import MODELS
    from kdistill.models.registry import builder_arguments

    for name in [kind] if kind else LISTS:
        if name == "recipes":
            entries = {recipe: recipe_summary(path) for recipe, path in builtin_recipes().items()}
        elif name == "models":
            entries = {model: f"{info.description}{f'  (args: {a})' if (a := builder_arguments(info.builder)) else ''}"
                       for model, info in MODELS.items()}
        elif name == "schemes":
            from kdistill.schemes import scheme_descriptions

            entries = scheme_descriptions()
        else:
            registry = {"datasets": DATASETS, "losses": LOSSES}[name]
            entries = {entry: info.description for entry, info in registry.items()}
        if not kind:
            print(f"{name}:")
        width = max(len(n) for n in entries)
        for entry, text in entries.items():
            print(f"{'  ' if not kind else ''}{entry:<{width}}  {text}")


def _discarded(args) -> tuple[str, ...]:
    """The roles --force throws away: what the command makes (the pipeline adds what depends on it)."""
    if not getattr(args, "force", False):
        return ()
    if args.command == "train":
        return ("baseline",) if args.baseline else ("teacher",)
    return {"run": ("teacher", "baseline", "student"), "distill": ("student",)}[args.command]


def _trained(args) -> tuple[str, ...]:
    """The roles the command trains if they are not done yet."""
    if args.command == "train":
        return ("baseline",) if args.baseline else ("teacher",)
    return {"run": ("teacher", "baseline", "student"), "distill": ("student",),
            "soft-labels": ("teacher",)}.get(args.command, ())


def _sweep(args) -> None:
    from kdistill.sweep import Sweep, parse_seeds

    sweep = Sweep(args.recipe, args.overrides, parse_seeds(args.seeds), name=args.name, jobs=args.jobs)
    print(f"sweep {sweep.folder}: {len(sweep.cells)} runs ({len(sweep.cells) // len(sweep.seeds)} grid points x "
          f"{len(sweep.seeds)} seeds), {args.jobs} at a time", flush=True)
    path = sweep.run()
    print(path.read_text(), end="")
    print(f"\nresults: {path} and {path.with_suffix('.csv')}")


def _inspect(args) -> None:
    from pathlib import Path

    import torch

    from kdistill.config.describe import builtin_recipes
    from kdistill.inspection import TAP_HINT, format_table, module_table
    from kdistill.models import MODELS
    from kdistill.models.probe import count_parameters

    if args.target in MODELS and args.target not in builtin_recipes() and not Path(args.target).exists():
        from omegaconf import OmegaConf

        from kdistill.models.registry import create_model

        shape = _input_shape(args.input_shape)
        if args.classes < 1:
            raise KdistillError(f"--classes must be at least 1, got {args.classes}")
        bad = [item for item in args.overrides if "=" not in item or not item.split("=", 1)[0].isidentifier()]
        if bad:
            raise KdistillError(f"model arguments are name=value, got {bad[0]!r} (e.g. width=16)")
        kwargs = OmegaConf.to_container(OmegaConf.from_dotlist(args.overrides))
        model = create_model(args.target, shape, args.classes, **kwargs)
        print(f"{args.target} ({count_parameters(model):,} parameters), a batch of 2 inputs of "
              f"{'x'.join(map(str, shape))}, {args.classes} classes")
        print(format_table(module_table(model, torch.zeros(2, *shape))))
        print(TAP_HINT)
        return
    from kdistill.config import load_config
    from kdistill.pipeline import Pipeline
    from kdistill.train.loop import unpack

    cfg = load_config(args.target, args.overrides)
    with Pipeline(cfg, progress="quiet", claim=False) as pipeline:
        inputs = unpack(next(iter(pipeline.loader("val"))))[0][:2].cpu()  # models are built on the CPU
        roles = ("teacher", "student") if args.role == "both" else (args.role,)
        for i, role in enumerate(roles):
            model = pipeline.build(role)
            data = pipeline.data
            print(("\n" if i else "") + f"{role}: {pipeline.specs[role].name} ({count_parameters(model):,} "
                  f"parameters), 2 validation images of {data.name} ({'x'.join(map(str, data.input_shape))})")
            print(format_table(module_table(model, inputs)))
        print(TAP_HINT)


def _input_shape(text: str) -> tuple[int, int, int]:
    parts = text.replace("x", ",").split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise KdistillError(f"--input-shape is channels,height,width (e.g. 3,32,32), got {text!r}")
    return tuple(int(p) for p in parts)


def _report_on_folders(args) -> bool:
    """`kdistill report PATH...` over run and sweep folders; False when given a recipe instead."""
    from pathlib import Path

    paths = [args.recipe, *args.overrides]
    if not Path(args.recipe).is_dir():
        return False
    from kdistill.study import write_study

    out = Path(args.out) if args.out else Path(paths[0]) if len(paths) == 1 else Path("kdistill_report")
    path = write_study(paths, out)
    if not args.quiet:
        print(path.read_text(), end="")
    print(f"\nreport: {path}")
    return True


def _run(args) -> None:
    from kdistill.config import load_config
    from kdistill.pipeline import Pipeline
    from kdistill.train import distributed

    if args.command == "report" and _report_on_folders(args):
        return
    if getattr(args, "out", None):
        raise KdistillError("report --out applies to run and sweep folders (kdistill report PATH...), not to a recipe")
    cfg = load_config(args.recipe, args.overrides)
    if args.command == "config":
        from kdistill.config.describe import annotated_yaml

        print(annotated_yaml(cfg), end="")
        return
    progress = "quiet" if args.quiet or not distributed.is_main() else "auto"
    if cfg.scheme != "offline":
        _run_scheme(args, cfg, progress)
        return
    if args.command == "check":
        with Pipeline(cfg, progress=progress, claim=False) as pipeline:
            print(pipeline.describe())
        return
    with Pipeline(cfg, resume=args.resume, discard=_discarded(args), trains=_trained(args),
                  progress=progress) as pipeline:
        _step(args, pipeline)


def _run_scheme(args, cfg, progress: str) -> None:
    """A recipe whose scheme is not offline: `run` runs it whole, `check` checks it; its parts are ordinary
    run folders that the other commands can be pointed at."""
    from kdistill.report import comparison_table, result_lines
    from kdistill.schemes import SCHEMES, run_recipe
    from kdistill.schemes.run import SchemeRun

    if args.command == "check":
        with SchemeRun(cfg, progress=progress, claim=False) as run:
            info = SCHEMES[cfg.scheme]
            print(f"scheme {cfg.scheme}: {info.description}\nrun folder: {run.folder}\ndata: {run.data.describe()}")
            for line in info.plan(cfg) if info.plan else []:
                print(f"  {line}")
        return
    if args.command != "run":
        raise KdistillError(f"scheme {cfg.scheme} runs whole with `kdistill run`; its parts are ordinary run folders "
                            f"inside {cfg.out_dir}/{cfg.name}, which `kdistill report FOLDER` reads")
    metrics = run_recipe(cfg, resume=args.resume, force=args.force, progress=progress)
    if metrics:
        print(comparison_table(metrics))
        print("", *result_lines(metrics), sep="\n")
        print(f"report: {cfg.out_dir}/{cfg.name}/report.md; plots: {cfg.out_dir}/{cfg.name}/curves.png")


def _step(args, pipeline) -> None:
    command = args.command
    # Under torchrun the other processes train alongside rank 0; rank 0 alone evaluates, writes and prints.
    say = print if pipeline.main else _silent
    if not pipeline.main and command not in ("run", "train", "distill", "soft-labels"):
        return
    if command == "run":
        from kdistill.report import comparison_table, result_lines

        metrics = pipeline.run()  # writes the report too
        if not pipeline.main:
            return
        say(comparison_table(metrics))
        say("", *result_lines(metrics), sep="\n")
        say(f"report: {pipeline.run_dir / 'report.md'}; plots: {pipeline.run_dir / 'curves.png'}")
        from kdistill.deploy.compress import compress, wants_compression

        if wants_compression(pipeline.cfg):
            from kdistill.deploy.frontier import compression_table

            say(compression_table(compress(pipeline, resume=args.resume)))
            say(f"compressed: {pipeline.run_dir / 'compressed' / 'report.md'}")
    elif command == "train":
        role = "baseline" if args.baseline else "teacher"
        pipeline.model(role)
        say(f"{role}: {pipeline.run_dir / role}")
    elif command == "distill":
        if not pipeline.available("teacher"):
            raise KdistillError(f"no trained teacher in {pipeline.run_dir}: run `kdistill train` with the same "
                                "recipe first, or set teacher.checkpoint")
        pipeline.model("student")
        say(f"student: {pipeline.run_dir / 'student'}")
    elif command == "soft-labels":
        if pipeline.teacher_signal == "live":
            say(f"note: this recipe's student gets a live teacher ({pipeline.signal_reason}); "
                "the cache built here serves unaugmented runs", file=sys.stderr)
        logits, path, built, seconds = pipeline.soft_labels()
        pipeline.teacher_features(path.stem, rebuild=built)  # and the tapped features, keyed by these soft labels
        size = path.stat().st_size
        rows = f"{pipeline.views} views x {logits.shape[0] // pipeline.views}" if pipeline.views else logits.shape[0]
        from kdistill.distill import TopKLogits

        kept = f"top {logits.k} of {logits.shape[1]}" if isinstance(logits, TopKLogits) else logits.shape[1]
        say(f"{'built' if built else 'already cached'}: {path} ({rows} x {kept} logits, "
            f"{size / 1024:.0f} KiB, {seconds:.1f}s)")
    elif command == "eval":
        say(pipeline.report(pipeline.evaluate()))
    elif command == "report":
        say(pipeline.report())
        say(f"\nreport: {pipeline.run_dir / 'report.md'}")


def _compress(args) -> None:
    from pathlib import Path

    from kdistill.config import load_config
    from kdistill.deploy.compress import compress
    from kdistill.deploy.frontier import compression_table, headline
    from kdistill.pipeline import CONFIG_FILE, Pipeline

    run_dir = Path(args.run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise KdistillError(f"{run_dir} is not a kdistill run folder (no {CONFIG_FILE}); give the folder "
                            "`kdistill run` made")
    quantize = sorted({"static" if mode == "int8" else mode for mode in args.quantize})
    # Step flags say the whole list of steps: they replace the run's recorded ones (its recipe's, or the
    # last compress's), which run again when no step flag is given.
    steps = [f"compress.prune=[{','.join(args.prune)}]", f"compress.quantize=[{','.join(quantize)}]",
             f"compress.export={'true' if args.export else 'false'}"]
    flags = [f"out_dir={run_dir.resolve().parent}", f"name={run_dir.resolve().name}",
             *(steps if args.prune or quantize or args.export else []),
             *([f"compress.teacher={args.teacher}"] if args.teacher else []),
             *([f"compress.source={args.source}"] if args.source else [])]
    cfg = load_config(run_dir / CONFIG_FILE, [*args.overrides, *flags])
    with Pipeline(cfg, trains=(), progress="quiet" if args.quiet else "auto") as pipeline:
        metrics = compress(pipeline, resume=args.resume)
    print(compression_table(metrics))
    if (line := headline(metrics)) is not None:
        print(f"\n{line}")
    print(f"\nreport: {run_dir / 'compressed' / 'report.md'}; plot: {run_dir / 'compressed' / 'frontier.png'}")


def _predict(args) -> None:
    from kdistill.deploy.predict import predict

    if args.top < 1:
        raise KdistillError(f"--top must be at least 1, got {args.top}")
    for result in predict(args.model_dir, args.inputs, args.runtime, args.top,
                          note=_silent if args.quiet else lambda line: print(line, file=sys.stderr)):
        print(f"{result.source}: " + ", ".join(f"{name} {p:.3f}" for name, p in result.top))


def _silent(*args, **kwargs) -> None:
    pass


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _nproc(args) -> int | None:
    """The number of processes to launch for --nproc N, or None to go on in this process."""
    from kdistill.train import distributed

    nproc = getattr(args, "nproc", None)
    if nproc is None:
        return None
    if nproc < 1:
        raise KdistillError(f"--nproc must be at least 1, got {nproc}")
    if distributed.launched():
        started = int(os.environ["WORLD_SIZE"])
        if nproc != started:
            raise KdistillError(f"--nproc {nproc}, but torchrun started {started} processes: drop --nproc under "
                                "torchrun")
        return None
    return nproc if nproc > 1 else None


def _without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            kept.append(item)
    return kept


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"kdistill: warning: {_one_line(message)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """The `kdistill` command. Exit codes: 0 done, 1 training diverged or an unexpected error (a bug:
    KDISTILL_TRACEBACK=1 shows where), 2 bad input or a folder, file or disk we cannot use, 130 interrupted."""
    parser = build_parser()
    # Overrides may come after flags (`run r.yaml --quiet a=1`), which argparse won't interleave.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides += extra
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        if not _is_main_process():
            warnings.simplefilter("ignore")  # rank 0 says it once
        try:
            nproc = _nproc(args)
            if nproc is not None:
                from kdistill.train.distributed import launch

                return launch(_without_nproc(sys.argv[1:] if argv is None else list(argv)), nproc)
            if args.command == "list":
                _list(args.kind)
            elif args.command == "sweep":
                _sweep(args)
            elif args.command == "inspect":
                _inspect(args)
            elif args.command == "compress":
                _compress(args)
            elif args.command == "predict":
                _predict(args)
            else:
                _run(args)
        except KdistillError as err:
            print(f"kdistill: error: {_one_line(err)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except FloatingPointError as err:
            print(f"kdistill: training diverged: {_one_line(err)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nkdistill: interrupted; continue with --resume", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `kdistill config r | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush stays quiet
            return 0
        except OSError as err:  # a full disk, a folder that vanished, a permission: the system said no
            where = f" ({err.filename})" if err.filename else ""
            print(f"kdistill: error: {_one_line(err.strerror or err)}{where}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except Exception as err:  # noqa: BLE001  the last line of defence: one line, not a traceback
            if os.environ.get("KDISTILL_TRACEBACK"):
                raise
            print(f"kdistill: unexpected {type(err).__name__}: {_one_line(err)} "
                  "(set KDISTILL_TRACEBACK=1 to see where)", file=sys.stderr)
            return 1
        finally:
            if "kdistill.train.distributed" in sys.modules:  # leave the process group cleanly under torchrun
                sys.modules["kdistill.train.distributed"].stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
