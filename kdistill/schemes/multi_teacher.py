"""Multi-teacher distillation: several teachers, of any architectures, teach one student.

Each teacher is trained (with `teacher.train`) or loaded from its checkpoint in its own run folder
(`teacher1/`, `teacher2/`, ...). Their weights are then put together in one file,
`ensemble.safetensors`, of the registered model `ensemble`, and the student is distilled from it in
an ordinary run folder (`student/`): its soft labels are each teacher's own cache entry (the one
an offline run with that teacher makes), combined per sample by `combine_teachers` at the
distillation temperature: a plain mean, fixed weights, or by confidence (lower entropy weighs more;
Hinton et al. 2015 average; You et al. 2017 and Zhang et al. 2022 weigh teachers).
"""

from __future__ import annotations

from omegaconf import OmegaConf

from kdistill.errors import KdistillError
from kdistill.evaluation import Entrant
from kdistill.functional import COMBINATIONS
from kdistill.pipeline import recipe_objective
from kdistill.schemes import register_scheme
from kdistill.schemes.run import SchemeRun
from kdistill.storage import file_digest
from kdistill.train import distributed, load_tensors, save_tensors

ENSEMBLE_FILE = "ensemble.safetensors"
MAX_TEACHERS = 16


def check_multi_teacher(cfg) -> None:
    section = cfg.multi_teacher
    teachers = section.teachers
    if not 2 <= len(teachers) <= MAX_TEACHERS:
        raise KdistillError(f"multi_teacher.teachers lists {len(teachers)} teachers: give 2 to {MAX_TEACHERS}, "
                            "each {name, kwargs, checkpoint} (a checkpoint is loaded, otherwise the teacher is "
                            "trained with teacher.train)")
    if section.combine not in COMBINATIONS:
        raise KdistillError(f"multi_teacher.combine: {section.combine!r} is not one of {', '.join(COMBINATIONS)}")
    weights = list(section.weights)
    if section.combine == "weights":
        if len(weights) != len(teachers) or any(not w >= 0 for w in weights) or sum(weights) <= 0:
            raise KdistillError(f"multi_teacher.weights: combine=weights needs one weight >= 0 per teacher "
                                f"({len(teachers)}), not all 0; got {weights}")
    elif weights:
        raise KdistillError(f"multi_teacher.weights is set but combine={section.combine}: set combine=weights, or "
                            "drop the weights")
    if recipe_objective(cfg).teacher_taps:
        raise KdistillError("distill.losses: a term taps the teacher's features, but multi_teacher combines the "
                            "teachers' outputs only; use response terms (kd, js, dist, ...) with several teachers")


def _members(cfg) -> list[dict]:
    return [{"name": t.name, "kwargs": OmegaConf.to_container(t.kwargs, resolve=True)}
            for t in cfg.multi_teacher.teachers]


def plan_multi_teacher(cfg) -> list[str]:
    lines = [f"teacher{k}/: {t.name} {OmegaConf.to_container(t.kwargs) or ''}".rstrip() + ", " +
             (f"loaded from {t.checkpoint}" if t.checkpoint else f"trained for {cfg.teacher.train.epochs} epochs")
             for k, t in enumerate(cfg.multi_teacher.teachers, start=1)]
    return [*lines, f"student/: {cfg.student.name} from the teachers combined by {cfg.multi_teacher.combine} at T = "
                    f"{cfg.distill.temperature:g}, and from scratch"]


@register_scheme("multi_teacher", "several teachers of any architectures, their softened outputs combined by "
                                  "mean, fixed weights or per-sample confidence, teach one student",
                 check_multi_teacher, plan_multi_teacher)
def multi_teacher(run: SchemeRun) -> dict:
    cfg = run.cfg
    section = cfg.multi_teacher
    # Teacher k is trained with the recipe's seed + k - 1: two teachers of one architecture differ.
    teachers = [run.part_config(f"teacher{number}", {
        "teacher.name": teacher.name, "teacher.kwargs": OmegaConf.to_container(teacher.kwargs, resolve=True),
        "teacher.checkpoint": teacher.checkpoint, "seed": cfg.seed + number - 1})
        for number, teacher in enumerate(section.teachers, start=1)]
    # Every teacher is built (name, arguments, class count, checkpoint) before any of them trains.
    run.check_models((spec, f"multi_teacher.teachers[{number}]") for number, spec in enumerate(section.teachers))
    pipelines = []
    for part in teachers:
        with run.pipeline(part, trains=("teacher",)) as pipeline:
            pipeline.model("teacher")
        distributed.barrier()  # under torchrun: rank 0 has written the teacher before anyone reads it
        pipelines.append(pipeline)
    changed = _write_ensemble(run, pipelines)
    combined = {"name": "ensemble", "kwargs": {"members": _members(cfg), "combine": section.combine,
                                               "weights": list(section.weights) or None,
                                               "temperature": cfg.distill.temperature}}
    part = run.part_config("student", {"teacher.name": combined["name"], "teacher.kwargs": combined["kwargs"],
                                       "teacher.checkpoint": str(run.folder / ENSEMBLE_FILE)})
    with run.pipeline(part, discard=("student",) if changed else ()) as student:
        student.run()
    entrants: dict[str, Entrant] = {}
    for number, pipeline in enumerate(pipelines, start=1):
        entrants[f"teacher{number}"] = pipeline.entrant("teacher",
                                               f"teacher {number} ({pipeline.specs['teacher'].name})")
    entrants["teacher"] = student.entrant("teacher", f"teachers combined ({section.combine}, T = "
                                                      f"{cfg.distill.temperature:g})")
    entrants["baseline"] = student.entrant("baseline", "student from scratch")
    entrants["student"] = student.entrant("student", "student distilled from the teachers")
    histories = {f"teacher {n}": p.role_dir("teacher") / "metrics.jsonl" for n, p in enumerate(pipelines, 1)}
    histories.update({"student from scratch": student.role_dir("baseline") / "metrics.jsonl",
                      "student distilled": student.role_dir("student") / "metrics.jsonl"})
    return run.compare(entrants, student, histories=histories, notes=[
        "The combined teachers' row is the distillation target: their softened outputs combined at the "
        "distillation temperature, whose argmax is the prediction scored."])


def _write_ensemble(run: SchemeRun, pipelines) -> bool:
    """ensemble.safetensors from the teachers' files (members.0.*, ...), written by rank 0 under torchrun;
    True when it changed."""
    tensors = {}
    for number, pipeline in enumerate(pipelines):
        weights, _ = load_tensors(pipeline.checkpoint_path("teacher"))
        tensors.update({f"members.{number}.{key}": value for key, value in weights.items()})
    path = run.folder / ENSEMBLE_FILE
    before = file_digest(path) if path.exists() else None
    if run.main:
        save_tensors(path, tensors, {"model": "ensemble"})
    distributed.barrier()  # every process loads it next
    return before != file_digest(path)
