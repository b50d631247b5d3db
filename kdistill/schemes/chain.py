"""Chains of ordinary distillation runs, each link's student the next link's teacher.

- `assistant` (Mirzadeh et al. 2020, "Improved Knowledge Distillation via Teacher Assistant"):
  teacher -> assistant(s) -> student, the gap bridged in steps.
- `self`, born-again networks (Furlanello et al. 2018): the student's own architecture trained
  from scratch is generation 0; each next generation, the same architecture, is distilled from
  the one before; the generations' ensemble is reported too.
- `noisy_student` (Xie et al. 2020): the teacher, trained on the labelled data, labels the
  unlabelled pool; a noised student (train.augment, and dropout or stochastic depth given in
  noisy_student.noise), equal or larger, learns from both and becomes the next round's teacher.

Every link is an ordinary run folder (`link1/`, `link2/`, ... or `gen1/`, ...) with its teacher
given as `teacher.checkpoint`: the previous link's student file, so its soft labels are cached
like any teacher's. A link whose teacher changed (its previous link's student was retrained)
retrains its student; everything else that is done is kept, and a killed chain resumes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf

from kdistill.errors import KdistillError
from kdistill.evaluation import Entrant
from kdistill.models import count_parameters
from kdistill.models.ensemble import Ensemble
from kdistill.pipeline import MODEL_FILE, Pipeline, augmentation
from kdistill.schemes import register_scheme
from kdistill.schemes.run import SchemeRun
from kdistill.storage import file_digest
from kdistill.train import distributed

MAX_LINKS = 20


@dataclass
class Link:
    name: str  # the run folder's name inside the scheme's folder
    updates: dict[str, Any]  # config changes from the recipe
    before: Callable[[Pipeline], None] | None = None  # what to do in the claimed folder before it runs
    checks: list = field(default_factory=list)  # (spec, key) of models to build before anything trains


def _spec(model) -> dict[str, Any]:
    return {"name": model.name, "kwargs": OmegaConf.to_container(model.kwargs, resolve=True)}


def describe(spec: dict[str, Any]) -> str:
    """`resnet {'width': 16}`: a model spec in a plan's line."""
    return f"{spec['name']} {spec['kwargs'] or ''}".rstrip()


def _teacher_source(cfg) -> str:
    return f"loaded from {cfg.teacher.checkpoint}" if cfg.teacher.checkpoint else \
        f"trained for {cfg.teacher.train.epochs} epochs"


def run_links(run: SchemeRun, links: list[Link]) -> list[Pipeline]:
    """Run the links in order; returns their (closed) pipelines. Every listed model is built first."""
    run.check_models(check for link in links for check in link.checks)
    pipelines: list[Pipeline] = []
    teacher_changed = False
    for link in links:
        cfg = run.part_config(link.name, link.updates)
        student_file = run.folder / link.name / "student" / MODEL_FILE
        before = file_digest(student_file) if student_file.exists() else None
        run.progress.line(f"[{run.cfg.scheme}] {link.name}: {cfg.teacher.name} -> {cfg.student.name}")
        with run.pipeline(cfg, discard=("student",) if teacher_changed else ()) as pipeline:
            if link.before is not None:
                link.before(pipeline)
            pipeline.run()
        distributed.barrier()  # under torchrun: rank 0 has written the link's files before anyone reads them
        teacher_changed = before != file_digest(student_file)
        pipelines.append(pipeline)
    return pipelines


def _adopt_baseline(source: Path) -> Callable[[Pipeline], None]:
    """A link's step that takes the baseline an earlier link trained (the same model, training and data)."""
    return lambda pipeline: pipeline.adopt("baseline", source)


def _histories(pipelines: list[Pipeline], title: Callable[[int], str]) -> dict[str, Path]:
    return {title(i): p.role_dir("student") / "metrics.jsonl" for i, p in enumerate(pipelines)}


# -- teacher assistants ------------------------------------------------------------------------
def check_assistant(cfg) -> None:
    chain = cfg.assistant.chain
    if not chain:
        raise KdistillError("assistant.chain is empty: list the assistants between teacher and student, e.g. "
                            "assistant.chain='[{name: resnet, kwargs: {width: 16}}]'")
    if len(chain) >= MAX_LINKS:
        raise KdistillError(f"assistant.chain lists {len(chain)} assistants; at most {MAX_LINKS - 1}")
    for i, model in enumerate(chain):
        if model.checkpoint:
            raise KdistillError(f"assistant.chain[{i}].checkpoint: assistants are trained by the chain, each "
                                "distilled from the link before; to start from a trained teacher set "
                                "teacher.checkpoint")


def plan_assistant(cfg) -> list[str]:
    models = [_spec(cfg.teacher), *(_spec(m) for m in cfg.assistant.chain), _spec(cfg.student)]
    return [f"teacher: {describe(models[0])}, {_teacher_source(cfg)}",
            *(f"link{k}/: {describe(models[k - 1])} -> {describe(models[k])} ({cfg.train.epochs} epochs, and the "
              "same model from scratch)" for k in range(1, len(models)))]


@register_scheme("assistant", "teacher -> assistant(s) -> student, each link an ordinary distillation run "
                              "(Mirzadeh et al. 2020)", check_assistant, plan_assistant)
def assistant(run: SchemeRun) -> dict:
    cfg = run.cfg
    models = [_spec(cfg.teacher), *(_spec(m) for m in cfg.assistant.chain), _spec(cfg.student)]
    links = []
    for k in range(1, len(models)):
        updates = {"teacher.name": models[k - 1]["name"], "teacher.kwargs": models[k - 1]["kwargs"],
                   "student.name": models[k]["name"], "student.kwargs": models[k]["kwargs"]}
        if k > 1:
            updates["teacher.checkpoint"] = str(run.folder / f"link{k - 1}" / "student" / MODEL_FILE)
        checks = [(model, f"assistant.chain[{i}]") for i, model in enumerate(cfg.assistant.chain)] if k == 1 else []
        links.append(Link(f"link{k}", updates, checks=checks))
    pipelines = run_links(run, links)
    entrants = {"teacher": pipelines[0].entrant("teacher", "teacher")}
    for k, pipeline in enumerate(pipelines[:-1], start=1):
        name = pipeline.specs["student"].name
        entrants[f"assistant{k}"] = pipeline.entrant("student", f"assistant {k} distilled ({name})")
        entrants[f"assistant{k}_scratch"] = pipeline.entrant("baseline", f"assistant {k} from scratch ({name})")
    entrants["baseline"] = pipelines[-1].entrant("baseline", "student from scratch")
    entrants["student"] = pipelines[-1].entrant("student", "student distilled through the chain")
    histories = _histories(pipelines, lambda i: f"link {i + 1} student")
    return run.compare(entrants, pipelines[-1], histories=histories)


# -- born-again networks -------------------------------------------------------------------------
SELF_MODES = ("born_again", "exits")


def check_self(cfg) -> None:
    section = cfg.self_distill
    if section.mode not in SELF_MODES:
        raise KdistillError(f"self_distill.mode: {section.mode!r} is not one of {', '.join(SELF_MODES)}")
    if section.mode == "exits":
        if not section.exits:
            raise KdistillError("self_distill.exits is empty: list the tap paths of the shallow stages that get a "
                                "classifier (`kdistill inspect RECIPE --role student` shows them)")
        if not 0 <= section.alpha <= 1 or section.temperature <= 0 or section.feature_weight < 0:
            raise KdistillError("self_distill: alpha must be in [0, 1], temperature > 0 and feature_weight >= 0")
        return
    generations = section.generations
    if not (isinstance(generations, int) and 1 <= generations < MAX_LINKS):
        raise KdistillError(f"self_distill.generations: born-again generations after the first, 1 to "
                            f"{MAX_LINKS - 1}; got {generations!r}")


def _generation_zero(pipeline: Pipeline) -> None:
    """Generation 0 is the student trained from scratch exactly as the baseline is (same model, training,
    seed and batches): train it once, as the baseline, and take it as the teacher."""
    pipeline.model("baseline")
    pipeline.adopt("teacher", pipeline.role_dir("baseline"))


def plan_self(cfg) -> list[str]:
    section, student = cfg.self_distill, describe(_spec(cfg.student))
    if section.mode == "exits":
        return [f"scratch/: {student} from scratch ({cfg.train.epochs} epochs)",
                f"exits/: {student} with exits at {', '.join(section.exits)}, taught by "
                f"{section.deepest or 'the input of its last Linear'} and its output"]
    return [f"gen1/: {student} from scratch (generation 0, also the baseline), then generation 1 from it",
            *(f"gen{k}/: generation {k} from generation {k - 1}" for k in range(2, section.generations + 1))]


@register_scheme("self", "self-distillation: born-again generations of the student, their ensemble reported "
                         "(Furlanello et al. 2018), or exits on shallow stages taught by the deepest output, each "
                         "exit's accuracy and latency reported (self_distill.mode=exits; Zhang et al. 2019)",
                 check_self, plan_self)
def self_distillation(run: SchemeRun) -> dict:
    if run.cfg.self_distill.mode == "exits":
        from kdistill.schemes.exits import run_exits

        return run_exits(run)
    return born_again(run)


def born_again(run: SchemeRun) -> dict:
    cfg = run.cfg
    student = _spec(cfg.student)
    same = {"teacher.name": student["name"], "teacher.kwargs": student["kwargs"]}
    links = [Link("gen1", {**same, "teacher.checkpoint": None,
                           "teacher.train": OmegaConf.to_container(cfg.train, resolve=True)},
                  before=_generation_zero)]
    for k in range(2, cfg.self_distill.generations + 1):
        first_baseline = run.folder / "gen1" / "baseline"
        links.append(Link(f"gen{k}", {**same, "teacher.checkpoint": str(run.folder / f"gen{k - 1}" / "student" /
                                                                        MODEL_FILE)},
                          before=_adopt_baseline(first_baseline)))
    pipelines = run_links(run, links)
    last = len(pipelines)
    entrants = {"teacher": pipelines[0].entrant("teacher", "generation 0 (from scratch)")}
    for k, pipeline in enumerate(pipelines[:-1], start=1):
        entrants[f"gen{k}"] = pipeline.entrant("student", f"generation {k}")
    entrants["student"] = pipelines[-1].entrant("student", f"generation {last}")
    members = [pipeline.model("student") for pipeline in pipelines]
    entrants["ensemble"] = Entrant(Ensemble(members), None, {
        "model": f"{last} x {student['name']}", "title": f"ensemble of generations 1-{last}"})
    histories = {"generation 0": pipelines[0].role_dir("teacher") / "metrics.jsonl",
                 **_histories(pipelines, lambda i: f"generation {i + 1}")}
    return run.compare(entrants, pipelines[-1], histories=histories,
                       notes=["Generation 0 is the student trained from scratch: it is also the baseline."],
                       aliases={"baseline": ("teacher", "student from scratch (= generation 0)")})


# -- noisy student ---------------------------------------------------------------------------------
def check_noisy_student(cfg) -> None:
    section = cfg.noisy_student
    if not (isinstance(section.rounds, int) and 1 <= section.rounds < MAX_LINKS):
        raise KdistillError(f"noisy_student.rounds: 1 to {MAX_LINKS - 1} rounds, got {section.rounds!r}")
    if section.students and len(section.students) != section.rounds:
        raise KdistillError(f"noisy_student.students lists {len(section.students)} models for {section.rounds} "
                            "rounds: give one per round, or none (the recipe's student in every round)")
    for i, model in enumerate(section.students):
        if model.checkpoint:
            raise KdistillError(f"noisy_student.students[{i}].checkpoint: each round's student is trained; drop it")
    if cfg.data.labelled_fraction == 1 and not cfg.data.unlabelled.name:
        raise KdistillError("noisy_student learns from unlabelled images: set data.labelled_fraction below 1 (the "
                            "rest of the training split loses its labels) or name a pool in data.unlabelled.name")


def _round_students(cfg) -> list[dict[str, Any]]:
    noise = OmegaConf.to_container(cfg.noisy_student.noise, resolve=True)
    models = list(cfg.noisy_student.students) or [cfg.student] * cfg.noisy_student.rounds
    return [{"name": m.name, "kwargs": {**OmegaConf.to_container(m.kwargs, resolve=True), **noise}} for m in models]


def plan_noisy_student(cfg) -> list[str]:
    data = cfg.data
    pool = [f"{100 * (1 - data.labelled_fraction):g} % of the training split"] if data.labelled_fraction < 1 else []
    pool += [f"the images of {data.unlabelled.name}"] if data.unlabelled.name else []
    return [f"teacher: {describe(_spec(cfg.teacher))}, {_teacher_source(cfg)} on the labelled data",
            f"unlabelled: {' and '.join(pool)}",
            *(f"round{k}/: {describe(student)}, noised, from {'the teacher' if k == 1 else f'round {k - 1}'}'s "
              "soft labels" for k, student in enumerate(_round_students(cfg), start=1))]


@register_scheme("noisy_student", "noisy student (Xie et al. 2020): rounds of a noised, equal or larger student "
                                  "learning from the teacher's soft labels on unlabelled data, then teaching the "
                                  "next round", check_noisy_student, plan_noisy_student)
def noisy_student(run: SchemeRun) -> dict:
    cfg = run.cfg
    students = _round_students(cfg)
    if not cfg.noisy_student.noise and augmentation(cfg.train) is None:
        warnings.warn("noisy_student: neither train.augment nor noisy_student.noise adds noise, so every round is "
                      "plain self-training; Xie et al. found the noise essential", stacklevel=2)
    teachers = [_spec(cfg.teacher), *students[:-1]]
    sizes = [count_parameters(run.check_model(OmegaConf.create(m), key, run.data)) for m, key in
             zip(teachers + students[-1:], ["teacher", *(f"noisy_student round {k}" for k in
                                                         range(1, len(students) + 1))], strict=True)]
    for k in range(1, len(sizes)):
        if sizes[k] < sizes[k - 1]:
            warnings.warn(f"noisy_student: round {k}'s student ({sizes[k]:,} parameters) is smaller than its "
                          f"teacher ({sizes[k - 1]:,}): Noisy Student makes it equal or larger", stacklevel=2)
    links = []
    for k, (teacher, student) in enumerate(zip(teachers, students, strict=True), start=1):
        updates = {"teacher.name": teacher["name"], "teacher.kwargs": teacher["kwargs"],
                   "student.name": student["name"], "student.kwargs": student["kwargs"]}
        before = None
        if k > 1:
            updates["teacher.checkpoint"] = str(run.folder / f"round{k - 1}" / "student" / MODEL_FILE)
            if student == students[0]:  # the same model from scratch as round 1's baseline
                before = _adopt_baseline(run.folder / "round1" / "baseline")
        links.append(Link(f"round{k}", updates, before=before))
    pipelines = run_links(run, links)
    entrants = {"teacher": pipelines[0].entrant("teacher", "teacher (labelled data)")}
    for k, pipeline in enumerate(pipelines[:-1], start=1):
        entrants[f"round{k}"] = pipeline.entrant("student", f"round {k} student")
    entrants["baseline"] = pipelines[-1].entrant("baseline", "student from scratch (labelled data)")
    entrants["student"] = pipelines[-1].entrant("student", f"round {len(pipelines)} student")
    return run.compare(entrants, pipelines[-1], histories=_histories(pipelines, lambda i: f"round {i + 1} student"))
