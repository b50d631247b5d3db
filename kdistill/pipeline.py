"""The pipeline: teacher -> soft labels -> baseline and distilled student -> evaluation -> report.

A `Pipeline` owns one run folder, `<out_dir>/<name>/`:

    config.yaml                the resolved config
    teacher/ baseline/ student/
        model.safetensors      final weights (best validation epoch); present = step done
        metrics.jsonl          one line per epoch
        summary.json           training time and model selection
        train_state.safetensors   for --resume; removed once model.safetensors is written
    metrics.json, report.md, curves.png

Each step can run alone (the CLI's subcommands); a step whose model.safetensors exists is
reused, an interrupted one is continued with `resume=True`.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdistill.data import Augment, BatchLoader, load_data
from kdistill.distill import Distiller, cached_teacher_logits
from kdistill.distill.signals import weights_digest
from kdistill.errors import KdistillError
from kdistill.evaluation import gap_recovered, model_metrics
from kdistill.losses import build_objective, cross_entropy_objective
from kdistill.models import create_model, output_classes
from kdistill.report import ROLES, comparison_table, write_report
from kdistill.train import Progress, evaluate, fit, load_model, save_model
from kdistill.train.checkpoint import atomic_write_text
from kdistill.train.loop import STATE_FILE

MODEL_FILE = "model.safetensors"


class Pipeline:
    def __init__(self, cfg: DictConfig, *, resume: bool = False, force: bool = False, progress: str = "auto"):
        self.cfg = cfg
        self.resume = resume
        self.progress = Progress(progress)
        self.run_dir = Path(cfg.out_dir) / cfg.name
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.data = load_data(cfg.data.name, cfg.data.root, cfg.data.val_size, cfg.data.split_seed,
                              cfg.data.download)
        self._models: dict[str, nn.Module] = {}
        for role in ("teacher", "student"):  # a wrong name, argument or class count stops us before any work
            self.build(role)
        self.objective = build_objective(cfg.distill.losses, cfg.distill.temperature, cfg.distill.normalize_weights,
                                         cfg.train.label_smoothing)
        self._claim_run_dir(force)

    # -- run folder -------------------------------------------------------------------------
    def _claim_run_dir(self, force: bool) -> None:
        """Refuse to mix results of different configs in one folder."""
        config_file = self.run_dir / "config.yaml"
        text = OmegaConf.to_yaml(self.cfg, resolve=True)
        changed = _changed_keys(OmegaConf.create(config_file.read_text()), self.cfg) if config_file.exists() else []
        if changed and not force:
            raise KdistillError(
                f"{self.run_dir} holds a run with another config ({', '.join(changed[:3])}"
                f"{' ...' if len(changed) > 3 else ''} differ); pick another name=... or pass --force to start over"
            )
        if force and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config_file, text)

    def role_dir(self, role: str) -> Path:
        return self.run_dir / role

    def done(self, role: str) -> bool:
        return (self.role_dir(role) / MODEL_FILE).exists()

    def summary(self, role: str) -> dict:
        path = self.role_dir(role) / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def available(self, role: str) -> bool:
        """Trained already (or, for the teacher, given as a checkpoint)."""
        return self.done(role) or (role == "teacher" and bool(self.cfg.teacher.checkpoint))

    # -- data ------------------------------------------------------------------------------
    def loader(self, split: str, train_cfg=None) -> BatchLoader:
        """Training loader (shuffled, augmented) when train_cfg is given, else an evaluation one."""
        data, cfg = self.data, self.cfg
        if train_cfg is not None:
            return BatchLoader(getattr(data, split), train_cfg.batch_size, mean=data.mean, std=data.std,
                               shuffle=True, augment=augmentation(train_cfg), seed=cfg.seed)
        return BatchLoader(getattr(data, split), cfg.eval.batch_size, mean=data.mean, std=data.std)

    # -- models ----------------------------------------------------------------------------
    def build(self, role: str) -> nn.Module:
        spec = self.cfg.teacher if role == "teacher" else self.cfg.student
        torch.manual_seed(self.cfg.seed)  # baseline and student start from the same weights
        kwargs = OmegaConf.to_container(spec.kwargs, resolve=True)
        try:
            model = create_model(spec.name, self.data.input_shape, self.data.num_classes, **kwargs)
        except (TypeError, ValueError) as err:  # a builder refusing a value, e.g. width="wide"
            key = "teacher" if role == "teacher" else "student"
            raise KdistillError(f"{key}.kwargs: model '{spec.name}' rejected {kwargs}: {err}") from None
        classes = output_classes(model, self.data.input_shape)
        if classes != self.data.num_classes:
            raise KdistillError(
                f"{'teacher' if role == 'teacher' else 'student'} '{spec.name}' outputs {classes} classes but "
                f"{self.data.name} has {self.data.num_classes}: the teacher, the student and the data must agree"
            )
        return model

    def model(self, role: str) -> nn.Module:
        """The trained model of a role: in memory, from the run folder, or trained now."""
        if role in self._models:
            return self._models[role]
        model = self.build(role)
        external = self.cfg.teacher.checkpoint if role == "teacher" else None
        if external:
            load_model(Path(external), model, what=f"teacher '{self.cfg.teacher.name}'")
            self.progress.line(f"[teacher] loaded {external}")
        elif self.done(role):
            if role == "student":
                self._check_same_teacher()
            load_model(self.role_dir(role) / MODEL_FILE, model, what=role)
            self.progress.line(f"[{role}] using {self.role_dir(role) / MODEL_FILE} (--force retrains)")
        else:
            self._train(role, model)
        self._models[role] = model
        return model

    def _train(self, role: str, model: nn.Module) -> None:
        cfg = self.cfg
        train_cfg = cfg.teacher.train if role == "teacher" else cfg.train
        out = self.role_dir(role)
        if (out / STATE_FILE).exists() and not self.resume:
            raise KdistillError(f"{out} holds an interrupted training: pass --resume to continue it "
                                "or --force to start the run over")
        if role == "student":
            distiller = self._distiller(model)
        else:
            if role == "teacher" and train_cfg.label_smoothing > 0:
                print("warning: teacher.train.label_smoothing > 0 erases the dark knowledge that distillation "
                      "transfers (Mueller et al. 2019); prefer 0 for teachers", file=sys.stderr)
            distiller = Distiller(None, model, cross_entropy_objective(train_cfg.label_smoothing))
        result = fit(distiller, self.loader("train", train_cfg), train_cfg, val_loader=self.loader("val"),
                     out_dir=out, resume=self.resume, seed=cfg.seed, progress=self.progress, label=role)
        summary = {
            "best_epoch": result.best_epoch,
            "best_val_accuracy": result.best_val_accuracy,
            "epochs_run": len(result.history),
            "stopped_early": result.stopped_early,
            "train_seconds": result.train_seconds,
            "train_samples_per_second": result.samples_per_second,
            "median_epoch_seconds": statistics.median(r["epoch_seconds"] for r in result.history),
        }
        if role == "student":
            summary["teacher_signal"] = self.teacher_signal
            summary["teacher_weights"] = weights_digest(self.model("teacher"))
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        save_model(out / MODEL_FILE, model, {"model": (cfg.teacher if role == "teacher" else cfg.student).name})
        (out / STATE_FILE).unlink(missing_ok=True)

    # -- teacher signal --------------------------------------------------------------------
    def _check_same_teacher(self) -> None:
        """A distilled student is only reused with the teacher it was distilled from."""
        summary = self.summary("student")
        if summary.get("teacher_weights") not in (None, weights_digest(self.model("teacher"))):
            raise KdistillError(f"{self.role_dir('student')} was distilled from another teacher than this run's; "
                                "pass --force to start over")

    @property
    def teacher_signal(self) -> str:
        if not self.objective.needs_teacher:
            return "none"
        if self.cfg.distill.cache_soft_labels and augmentation(self.cfg.train) is None \
                and not self.objective.teacher_taps:
            return "cached"
        return "live"

    def soft_labels(self) -> tuple[torch.Tensor, Path, bool, float]:
        """The teacher's logits for every training sample: cached on disk, built if missing."""
        started = time.perf_counter()
        loader = self.loader("train")  # in order, unaugmented: the same preprocessing as evaluation
        logits, path, built = cached_teacher_logits(
            self.model("teacher"), loader, self.data.train.images, loader.preprocessing, self.cfg.distill.cache_dir)
        return logits, path, built, time.perf_counter() - started

    def _distiller(self, student: nn.Module) -> Distiller:
        signal = self.teacher_signal
        soft_labels = None
        if signal == "cached":
            soft_labels, path, built, seconds = self.soft_labels()
            verb = "computed and stored" if built else "loaded"
            self.progress.line(f"[student] soft labels {verb} in {seconds:.1f}s: {path}")
        teacher = self.model("teacher") if signal == "live" else None
        return Distiller(teacher, student, self.objective, soft_labels=soft_labels)

    # -- evaluation and report -------------------------------------------------------------
    def evaluate(self) -> dict:
        """Evaluate every trained model once on the test set; writes metrics.json."""
        cfg = self.cfg
        metrics: dict = {}
        test, val = self.loader("test"), self.loader("val")
        teacher_predictions = None
        for role in ROLES:
            if not self.available(role):
                if role == "teacher":
                    raise KdistillError(f"no trained teacher in {self.run_dir}: run `kdistill train` first "
                                        "or set teacher.checkpoint")
                continue
            model = self.model(role)
            checkpoint = Path(cfg.teacher.checkpoint) if role == "teacher" and cfg.teacher.checkpoint else \
                self.role_dir(role) / MODEL_FILE
            m, predictions = model_metrics(
                model, test, input_shape=self.data.input_shape, teacher_predictions=teacher_predictions,
                checkpoint=checkpoint, latency_batches=list(cfg.eval.latency_batches),
                latency_repeats=cfg.eval.latency_repeats)
            if role == "teacher":
                teacher_predictions = predictions
            summary = self.summary(role)
            metrics[role] = {
                "model": (cfg.teacher if role == "teacher" else cfg.student).name,
                "val_accuracy": evaluate(model, val).accuracy,
                **m,
                "train_seconds": summary.get("train_seconds"),
                "train_samples_per_second": summary.get("train_samples_per_second"),
                "best_epoch": summary.get("best_epoch"),
            }
        if {"teacher", "baseline", "student"} <= metrics.keys():
            metrics["gap_recovered"] = gap_recovered(
                metrics["teacher"]["test_accuracy"], metrics["baseline"]["test_accuracy"],
                metrics["student"]["test_accuracy"])
            baseline_epoch = self.summary("baseline").get("median_epoch_seconds")
            student_epoch = self.summary("student").get("median_epoch_seconds")
            if baseline_epoch and student_epoch:
                metrics["distill_overhead"] = student_epoch / baseline_epoch
            metrics["teacher_signal"] = self.summary("student").get("teacher_signal")
        atomic_write_text(self.run_dir / "metrics.json", json.dumps(metrics, indent=2))
        return metrics

    def report(self, metrics: dict | None = None) -> str:
        if metrics is None:
            path = self.run_dir / "metrics.json"
            if not path.exists():
                raise KdistillError(f"{path} not found: run `kdistill eval` (or `kdistill run`) first")
            metrics = json.loads(path.read_text())
        write_report(self.run_dir, metrics, OmegaConf.to_yaml(self.cfg, resolve=True))
        return comparison_table(metrics)

    def run(self) -> dict:
        for role in ROLES:
            self.model(role)
        metrics = self.evaluate()
        self.report(metrics)
        return metrics


def augmentation(train_cfg) -> Augment | None:
    augment = Augment(crop_padding=train_cfg.augment.crop_padding, hflip=train_cfg.augment.hflip)
    return augment if augment.enabled else None


# Keys that change where or how fast things run, not what a run computes.
NEUTRAL_KEYS = ("out_dir", "threads", "data.root", "data.download", "distill.cache_dir", "eval.")


def _changed_keys(old: DictConfig, new: DictConfig) -> list[str]:
    flat_old = _flatten(OmegaConf.to_container(old, resolve=True))
    flat_new = _flatten(OmegaConf.to_container(new, resolve=True))
    return sorted(k for k in flat_old.keys() | flat_new.keys()
                  if flat_old.get(k) != flat_new.get(k) and not k.startswith(NEUTRAL_KEYS))


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
