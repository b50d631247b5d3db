"""Distillation overhead: seconds per distillation epoch / seconds per baseline epoch, one process.

Variants, each one full epoch over the Fashion-MNIST training split, interleaved round by round:
  baseline      the student with cross-entropy only
  kd/cached     0.5 CE + 0.5 KD, teacher logits looked up from the soft-label table
  kd/live       0.5 CE + 0.5 KD, teacher run on every batch (frozen, eval, inference mode)
With `--hint STUDENT_PATH:TEACHER_PATH` (a feature term between two modules, `kdistill inspect` lists
them; `--hint-type`: fitnet, at, ...), two more:
  hint/live     0.5 CE + 0.5 KD + the term, the teacher run on every batch for its logits and features
  hint/cached   the same from the soft-label table and the teacher's cached features (memory-mapped,
                built once before timing; its build time is printed)
With `--augment` (random crop after 2 pixels of padding and horizontal flips), three more:
  aug/baseline         the student with cross-entropy on augmented batches
  aug/kd-live          KD, the teacher run on every augmented batch
  aug/kd-cached-views  KD from the teacher's logits on `--views` fixed views of each sample
                       (built once before timing; its build time is printed)
The teacher is seed 000's TeacherModel (`--teacher`/`--student` to change); its weights do not
change the cost, so it is used untrained unless `--teacher-checkpoint` is given.

    make bench-overhead      # or: python benchmarks/overhead.py --rounds 5
    python -m benchmarks.overhead --device cuda --precision bf16   # on a GPU
    python -m benchmarks.overhead --hint conv2:stages.1 --teacher resnet --teacher-kwargs '{"width": 32, "depth": 2}'
    python -m benchmarks.overhead --augment --teacher resnet --teacher-kwargs '{"width": 64, "blocks": [2, 2, 2]}'
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.timing import check_environment, interleaved, median
from kdistill.config import train_config
from kdistill.data import Augment, BatchLoader, load_data
from kdistill.distill import Distiller, teacher_logits
from kdistill.distill.signals import cached_teacher_features
from kdistill.losses import build_objective, cross_entropy_objective
from kdistill.models import create_model
from kdistill.train import Progress, fit, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--teacher", default="seed_teacher")
    parser.add_argument("--teacher-kwargs", default="{}", help='JSON, e.g. \'{"width": 32}\'')
    parser.add_argument("--teacher-checkpoint", default=None)
    parser.add_argument("--student", default="seed_student")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...: model, data and soft labels all live there")
    parser.add_argument("--augment", action="store_true", help="also time augmented training (crop and flip)")
    parser.add_argument("--views", type=int, default=8, help="views per sample of the cached-views table")
    parser.add_argument("--hint", default=None, metavar="STUDENT_PATH:TEACHER_PATH",
                        help="also time a feature term between these modules, live and from cached features")
    parser.add_argument("--hint-type", default="fitnet", help="the feature term of --hint (fitnet, at, nst, vid, ...)")
    args = parser.parse_args()

    device = torch.device(args.device)
    data = load_data("fashion_mnist")
    shape, classes = data.input_shape, data.num_classes
    teacher = create_model(args.teacher, shape, classes, **json.loads(args.teacher_kwargs))
    if args.teacher_checkpoint:
        load_model(args.teacher_checkpoint, teacher, what="teacher")
    teacher.to(device)

    def batches(size: int, **kwargs) -> BatchLoader:
        return BatchLoader(data.train, size, mean=data.mean, std=data.std, device=device, **kwargs)

    loader = batches(128, shuffle=True)
    table = teacher_logits(teacher, batches(1000), len(data.train), args.precision)
    cfg = train_config(epochs=1, batch_size=128, optimizer="adam", lr=0.01, precision=args.precision)
    quiet = Progress("quiet")
    kd = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5}}

    def epoch(make_distiller, on=loader) -> float:
        torch.manual_seed(0)
        student = create_model(args.student, shape, classes)
        return fit(make_distiller(student), on, cfg, progress=quiet).train_seconds

    def distiller(teacher, student, objective, **kwargs) -> Distiller:
        return Distiller(teacher, student, objective, device=device, **kwargs)

    variants = {
        "baseline": lambda: epoch(lambda s: distiller(None, s, cross_entropy_objective())),
        "kd/cached": lambda: epoch(lambda s: distiller(None, s, build_objective(kd, 4.0), soft_labels=table)),
        "kd/live": lambda: epoch(lambda s: distiller(teacher, s, build_objective(kd, 4.0))),
    }
    if args.hint:
        student_path, _, teacher_path = args.hint.partition(":")
        hinted = {**kd, "hint": {"type": args.hint_type, "student": student_path, "teacher": teacher_path}}
        started = time.perf_counter()
        scratch = tempfile.TemporaryDirectory()  # removed when the benchmark ends
        features, _, _ = cached_teacher_features(teacher, batches(1000), "benchmark", (teacher_path,),
                                                 len(data.train), Path(scratch.name))  # memory-mapped, as in runs
        print(f"cached features ({teacher_path}): {len(data.train)} samples in {time.perf_counter() - started:.1f} s")
        variants.update({
            "hint/live": lambda: epoch(lambda s: distiller(teacher, s, build_objective(hinted, 4.0))),
            "hint/cached": lambda: epoch(lambda s: distiller(None, s, build_objective(hinted, 4.0), soft_labels=table,
                                                            teacher_features=features)),
        })
    if args.augment:
        augment = Augment(crop_padding=2, hflip=True)
        fresh = batches(128, shuffle=True, augment=augment)
        viewed = batches(128, shuffle=True, augment=augment, views=args.views)
        started = time.perf_counter()
        views = teacher_logits(teacher, batches(1000, augment=augment, views=args.views),
                               args.views * len(data.train), args.precision).half()
        print(f"cached-views table: {args.views} views x {len(data.train)} samples in "
              f"{time.perf_counter() - started:.1f} s")
        variants.update({
            "aug/baseline": lambda: epoch(lambda s: distiller(None, s, cross_entropy_objective()), fresh),
            "aug/kd-live": lambda: epoch(lambda s: distiller(teacher, s, build_objective(kd, 4.0)), fresh),
            "aug/kd-cached-views": lambda: epoch(
                lambda s: distiller(None, s, build_objective(kd, 4.0), soft_labels=views), viewed),
        })
    print(check_environment(), f"device {device}")
    interleaved(variants, 1)  # warm-up
    times = interleaved(variants, args.rounds)
    print(f"{'variant':<20} {'s/epoch (median)':>17} {'/ its baseline':>15}")
    for name, values in times.items():
        base = median(times["aug/baseline" if name.startswith("aug/") else "baseline"])
        print(f"{name:<20} {median(values):>17.2f} {median(values) / base:>15.3f}")
    print(json.dumps({name: values for name, values in times.items()}))


if __name__ == "__main__":
    main()
