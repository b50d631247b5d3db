"""The folder of a scheme's run, and the side-by-side comparison of every model the scheme made.

    <out_dir>/<name>/
        .kdistill-run.json     kdistill's marker, naming the scheme
        .lock, config.yaml     one process at a time; the recipe as resolved
        link1/ link2/ ...      the scheme's parts: ordinary run folders (assistant, self, multi_teacher)
        metrics.json, report.md, curves.png    every model the scheme made, measured side by side

A scheme never trains anything itself but through `fit` (the one loop) or a `Pipeline` (an
ordinary run folder); this class only claims the folder, derives the parts' configs from the
recipe and measures the result.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import statistics
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdistill import __version__
from kdistill.errors import KdistillError
from kdistill.evaluation import Entrant, compare_models, gap_recovered
from kdistill.models import create_model, output_classes
from kdistill.pipeline import (
    CONFIG_FILE,
    DERIVED_FILES,
    LOCK_FILE,
    MARKER_FILE,
    MODEL_FILE,
    ROLES,
    TRAINING_FIGURES,
    Pipeline,
    recipe_data,
)
from kdistill.report import write_report
from kdistill.storage import atomic_write_text, exclusive_lock
from kdistill.train import Progress, fit, load_model, save_model
from kdistill.train.loop import STATE_FILE


class SchemeRun:
    """`<out_dir>/<name>/` for a recipe whose `scheme` is not offline; a context manager (holds the lock).

    `force` retrains every part; `resume` continues interrupted trainings; `claim=False` checks and
    writes nothing (`kdistill check`).
    """

    def __init__(self, cfg: DictConfig, *, resume: bool = False, force: bool = False, progress: str = "auto",
                 claim: bool = True):
        self.cfg, self.resume, self.force = cfg, resume, force
        self.progress_mode = progress
        self.progress = Progress(progress)
        self.folder = Path(cfg.out_dir) / cfg.name
        self.main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes the scheme's files
        self._stack = contextlib.ExitStack()
        if self.main:  # the other processes of a torchrun work in the folder rank 0 has checked and claimed
            self._check_folder()
            if claim:
                self._claim()

    def __enter__(self) -> "SchemeRun":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _check_folder(self) -> None:
        folder = self.folder
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise KdistillError(f"out_dir/name: {folder} is a file or a link, not a folder; pick another name=")
        if not folder.is_dir() or not any(folder.iterdir()):
            return
        marker = folder / MARKER_FILE
        try:
            scheme = json.loads(marker.read_text()).get("scheme", "offline")
        except (OSError, ValueError, AttributeError):
            raise KdistillError(f"{folder} exists and was not made by kdistill (no readable {MARKER_FILE}); pick "
                                "another name=... or out_dir=...") from None
        if scheme != self.cfg.scheme:
            raise KdistillError(f"{folder} holds a run of scheme {scheme}, not {self.cfg.scheme}: pick another "
                                "name=... (kdistill never mixes the folders of two schemes)")

    def _claim(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise KdistillError(f"cannot write the run folder {self.folder} ({err.strerror or err}); set out_dir= "
                                "to a writable folder") from None
        if not (self.folder / MARKER_FILE).exists():
            atomic_write_text(self.folder / MARKER_FILE, json.dumps(
                {"made_by": "kdistill", "version": __version__, "scheme": self.cfg.scheme}, indent=2))
        self._stack.enter_context(exclusive_lock(self.folder / LOCK_FILE, f"run folder {self.folder}"))
        atomic_write_text(self.folder / CONFIG_FILE, OmegaConf.to_yaml(self.cfg, resolve=True))
        for name in DERIVED_FILES:  # they describe the models as they were
            (self.folder / name).unlink(missing_ok=True)

    # -- the parts ------------------------------------------------------------------------
    def part_config(self, name: str, updates: dict[str, Any]) -> DictConfig:
        """The recipe as an ordinary (offline) run named `name` inside this folder, with `updates`
        ({dotted key: value}; a model's kwargs are replaced whole, a schema section is merged into)."""
        cfg = copy.deepcopy(self.cfg)
        OmegaConf.set_readonly(cfg, False)
        cfg.scheme, cfg.out_dir, cfg.name = "offline", str(self.folder), name
        for key, value in updates.items():
            OmegaConf.update(cfg, key, value, merge=not key.endswith(".kwargs"))
        OmegaConf.set_readonly(cfg, True)
        return cfg

    def pipeline(self, cfg: DictConfig, *, discard=(), trains=ROLES, claim: bool = True) -> Pipeline:
        return Pipeline(cfg, resume=self.resume, discard=tuple(ROLES) if self.force else discard, trains=trains,
                        progress=self.progress_mode, claim=claim)

    @functools.cached_property
    def data(self):
        """The recipe's data (every part loads the same), for checks before any part runs."""
        return recipe_data(self.cfg)

    def check_models(self, models) -> None:
        """Build every (spec, config key) in `models` before anything trains."""
        for spec, key in models:
            self.check_model(spec, key, self.data)

    @staticmethod
    def check_model(spec, key: str, data) -> nn.Module:
        """Build a listed model on the CPU (and load its checkpoint, if it names one); a wrong name,
        argument, class count or checkpoint is one line naming `key`."""
        kwargs = OmegaConf.to_container(spec.kwargs, resolve=True)
        try:
            model = create_model(spec.name, data.input_shape, data.num_classes, **kwargs)
        except KdistillError as error:
            raise KdistillError(f"{key}: {error}") from None
        classes = output_classes(model, data.input_shape)
        if classes != data.num_classes:
            raise KdistillError(f"{key} '{spec.name}' outputs {classes} classes but {data.name} has "
                                f"{data.num_classes}: every model of the scheme must agree with the data")
        checkpoint = getattr(spec, "checkpoint", None)
        if checkpoint:
            if not Path(checkpoint).is_file():
                raise KdistillError(f"{key}.checkpoint: {checkpoint} not found; give the path of a .safetensors file")
            load_model(Path(checkpoint), model, what=f"{key} '{spec.name}'")
        return model

    # -- the result -----------------------------------------------------------------------
    def compare(self, entrants: dict[str, Entrant], pipeline: Pipeline, *, histories: dict[str, Path],
                notes: list[str] = (), aliases: dict[str, tuple[str, str]] | None = None) -> dict:
        """Measure every model side by side (agreement with the first), write metrics.json and report.md.

        Rows labelled teacher, baseline and student keep those meanings (what sweeps and reports read),
        and give the gap recovered when all three are there. `aliases` {label: (row, title)} names a
        measured row once more, outside the table (born-again's generation 0 is also the baseline).
        """
        if not self.main:
            return {}
        metrics, correct = compare_models(entrants, pipeline.loader("test"), pipeline.loader("val"),
                                          pipeline.data, self.cfg.eval, pipeline.device)
        metrics = {"scheme": self.cfg.scheme, "rows": list(entrants), **metrics}
        for label, (row, title) in (aliases or {}).items():
            metrics[label] = {**metrics[row], "title": title}
        if {"teacher", "baseline", "student"} <= correct.keys():
            metrics["gap_recovered"], metrics["gap_recovered_note"] = gap_recovered(
                correct["teacher"], correct["baseline"], correct["student"])
        atomic_write_text(self.folder / "metrics.json", json.dumps(metrics, indent=2))
        write_report(self.folder, metrics, OmegaConf.to_yaml(self.cfg, resolve=True), histories, list(notes))
        return metrics


    def train_in_folder(self, distiller, pipeline: Pipeline, folder: Path, label: str) -> dict:
        """Train `distiller` (several models, or one with exits) with the one loop in `folder`, resumable, on
        `pipeline`'s data; or load what this recipe trained there before. Writes model.safetensors (the
        distiller's `student`), objective.safetensors (its objective's parameters: exit heads) and
        summary.json. Returns the summary's training figures, for the rows."""
        cfg, digest = self.cfg, recipe_digest(self.cfg)
        done, parts = folder / MODEL_FILE, folder / OBJECTIVE_FILE
        summary = _read_summary(folder)
        if done.exists() and parts.exists() and summary.get("recipe") == digest and not self.force:
            prepare = getattr(distiller, "prepare", None)  # what the objective's parameters are made from
            if prepare is not None:
                prepare(pipeline.loader("val"))
            load_model(done, distiller.student, what=f"the models of {folder}")
            load_model(parts, distiller.objective, what=f"the loss terms of {folder}")
            self.progress.line(f"[{label}] using {done} (--force retrains)")
            return _figures(summary)
        if done.exists():
            self.progress.line(f"[{label}] {'--force' if self.force else 'the recipe changed'}: training again")
            done.unlink()
        if self.force:
            (folder / STATE_FILE).unlink(missing_ok=True)
        elif (folder / STATE_FILE).exists() and not self.resume:
            raise KdistillError(f"{folder} holds an interrupted training: pass --resume to continue it or --force "
                                "to start it over")
        result = fit(distiller, pipeline.loader("train", cfg.train), cfg.train,
                     val_loader=pipeline.loader("val", shard=True), out_dir=folder, resume=self.resume, seed=cfg.seed,
                     progress=self.progress, label=label, inputs={**distiller.fingerprint(), "recipe": digest})
        summary = {"recipe": digest, "best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
                   "train_seconds": result.train_seconds, "train_samples_per_second": result.samples_per_second,
                   "median_epoch_seconds": statistics.median(r["epoch_seconds"] for r in result.history)}
        if self.main:
            save_model(parts, distiller.objective, {"model": "loss terms"})
            atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2))
            save_model(done, distiller.student, {"model": cfg.student.name})
            (folder / STATE_FILE).unlink(missing_ok=True)
        return _figures(summary)


OBJECTIVE_FILE = "objective.safetensors"


def recipe_digest(cfg: DictConfig) -> str:
    """What a scheme's own training depends on: the recipe without the keys that only say where it runs."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in ("name", "out_dir", "threads", "device", "eval"):
        plain.pop(key, None)
    plain["data"].pop("root", None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()


def _read_summary(folder: Path) -> dict:
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _figures(summary: dict) -> dict:
    return {key: summary.get(key) for key in TRAINING_FIGURES}


class TrainedTogether(nn.Module):
    """What the loop trains for a scheme that is not one Distiller: a `student` module (several models, or
    one with exits) and an `objective` module (per-model objectives, exit heads); both train together."""

    def train(self, mode: bool = True) -> "TrainedTogether":
        self.training = mode
        self.student.train(mode)
        self.objective.train(mode)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.student.parameters(), *self.objective.parameters()]

    def forward(self, inputs):
        return self.student(inputs)

    def fit(self, train_loader, epochs: int, *, val_loader=None, seed: int = 0, out_dir=None, resume: bool = False,
            label: str = "together", progress: str = "auto", **train_options):
        """Train with the one loop (`Distiller.fit`'s options, TrainConfig fields); the models keep the selected
        epoch's weights."""
        from kdistill.config.loading import train_config

        cfg = train_config(epochs=epochs, **train_options)
        return fit(self, train_loader, cfg, val_loader=val_loader, seed=seed, out_dir=out_dir, resume=resume,
                   progress=Progress(progress), label=label, inputs=self.fingerprint())
