"""The pipeline: teacher -> soft labels -> baseline and distilled student -> evaluation -> report.

A `Pipeline` owns one run folder, `<out_dir>/<name>/`:

    .kdistill-run.json         marks the folder as kdistill's, records the digest of the data it trained on
    .lock                      held by the one process working in the folder
    config.yaml                the resolved config
    teacher/ baseline/ student/
        model.safetensors      final weights (best validation epoch); present = step done
        metrics.jsonl          one line per epoch
        summary.json           training time and model selection
        train_state.safetensors   for --resume; removed once model.safetensors is written
    metrics.json, report.md, curves.png    derived from the models; removed when a model changes

Each step can run alone (the CLI's subcommands); a step whose model.safetensors exists is
reused, an interrupted one is continued with `resume=True`. Everything that can be checked is
checked before the first epoch (config, data, models, paths, the folder's history), and a
folder is only ever written to, or cleared, when it carries kdistill's marker.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import shutil
import statistics
import time
import warnings
from collections.abc import Collection
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdistill import __version__
from kdistill.config.describe import flatten
from kdistill.data import Augment, BatchLoader, load_data
from kdistill.data.unlabelled import add_pool, select_pseudo_labelled, with_pool, withhold_labels
from kdistill.distill import Distiller, FeatureTaps, TopKLogits, cached_teacher_logits
from kdistill.distill.signals import (
    cached_teacher_features,
    check_cache_dir,
    choose_teacher_signal,
    default_cache_dir,
    table_subset,
    weights_digest,
)
from kdistill.distill.taps import check_tap_paths
from kdistill.errors import KdistillError
from kdistill.evaluation import Entrant, compare_models, gap_recovered
from kdistill.losses import DistillInputs, Objective, build_objective, cross_entropy_objective
from kdistill.models import count_parameters, create_model, output_classes
from kdistill.report import ROLES, comparison_table, write_report
from kdistill.storage import atomic_write_text, exclusive_lock, file_digest, remove_stale_temporaries
from kdistill.train import Progress, distributed, fit, load_model, save_model
from kdistill.train.devices import check_precision, device_name
from kdistill.train.loop import STATE_FILE, unpack

MODEL_FILE = "model.safetensors"
MARKER_FILE = ".kdistill-run.json"
LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
DERIVED_FILES = ("metrics.json", "report.md", "curves.png")  # computed from the models: stale when one changes
ROLE_FILES = (MODEL_FILE, "metrics.jsonl", "summary.json", STATE_FILE)  # what kdistill writes in a model's folder
SUMMARY_TYPES = {"best_epoch": int, "epochs_run": int, "best_val_accuracy": (int, float), "train_seconds": (int, float),
                 "train_samples_per_second": (int, float), "median_epoch_seconds": (int, float),
                 "teacher_signal": str, "teacher_weights": str}
# How a model was trained, from its summary.json, in every row of a comparison.
TRAINING_FIGURES = ("train_seconds", "train_samples_per_second", "median_epoch_seconds", "best_epoch")
# What a retrained step makes obsolete: a new teacher makes the distilled student stale.
DEPENDENTS = {"teacher": ("teacher", "student"), "baseline": ("baseline",), "student": ("student",)}
# Biggest input batch the evaluation may build at once (latency batches, evaluation batches).
MAX_BATCH_BYTES = 2 << 30


class Pipeline:
    """One run folder. `discard`: the roles to throw away and retrain (the CLI's --force); `trains`: the
    roles the command will train (an interrupted one needs `resume`).

    `claim=False` checks everything and touches nothing (`kdistill check`). Use it as a context
    manager (or call `close`) so the folder's lock is released.
    """

    def __init__(self, cfg: DictConfig, *, resume: bool = False, discard: Collection[str] = (),
                 trains: Collection[str] = ROLES, progress: str = "auto", claim: bool = True):
        self.cfg = cfg
        self.resume = resume
        self.trains = set(trains)  # the roles the caller means to train: their interrupted states are checked now
        self.redo: dict[str, str] = {}  # role -> the config change that makes it stale (set by _folder_verdict)
        self.run_dir = Path(cfg.out_dir) / cfg.name
        self._stack = contextlib.ExitStack()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = distributed.start(cfg.device)  # under torchrun: joins the process group
        self.main = distributed.is_main()  # only rank 0 writes files and prints
        self.progress = Progress(progress if self.main else "quiet")
        distributed.agree(OmegaConf.to_yaml(cfg, resolve=True), "config")
        trained = [("train", cfg.train)] + ([] if cfg.teacher.checkpoint else [("teacher.train", cfg.teacher.train)])
        for key, train in trained:
            check_precision(train.precision, self.device, f"{key}.precision")
            _check_batch_split(train.batch_size, f"{key}.batch_size")
        self.data = recipe_data(cfg)
        self._check_against_data()
        self._models: dict[str, nn.Module] = {}
        self.pool_rows: torch.Tensor | None = None  # the unlabelled samples the student learns from, once chosen
        self.specs = {role: (cfg.teacher if role == "teacher" else cfg.student) for role in ROLES}
        built = {}
        for role in ("teacher", "student"):  # a wrong name, argument or class count stops us before any work
            model = built[role] = self.build(role)
            if not (role == "teacher" and cfg.teacher.checkpoint):
                _check_trainable(model, f"{role} '{self.specs[role].name}'", self.data.input_shape)
        self.objective = recipe_objective(cfg)
        self._check_taps(built["student"], built["teacher"])
        self.teacher_signal, self.signal_reason = resolve_teacher_signal(cfg, self.objective)
        self._check_paths()
        discard = set(discard)
        if not claim:  # `kdistill check`: the verdict `run` would reach, without writing anything
            self._folder_verdict(discard)
            self._check_cache_place()
            return
        try:
            if self.main:
                self._claim_run_dir(discard)
                if self.cached:  # after the claim: the cache may live inside the run folder
                    check_cache_dir(self.cache_dir)
            distributed.barrier()  # the others go on once the folder is claimed (and cleared)
        except BaseException:
            self.close()
            raise
        # The log opens with what is trained on, once every check has passed (a refusal stays one line).
        self.progress.line(f"data: {self.data.describe()}")

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the run folder's lock."""
        self._stack.close()

    # -- checks before any work ------------------------------------------------------------
    def _check_against_data(self) -> None:
        """Settings that are only wrong for this data: found now, not after hours of training."""
        channels, height, width = self.data.input_shape
        for key, train in (("train", self.cfg.train), ("teacher.train", self.cfg.teacher.train)):
            padding = train.augment.crop_padding
            if padding > min(height, width) // 2:
                raise KdistillError(f"{key}.augment.crop_padding={padding} is too large for {height}x{width} images: "
                                    f"crops would be mostly black padding; use at most {min(height, width) // 2}")
            if train.augment.cutout > min(height, width):
                raise KdistillError(f"{key}.augment.cutout={train.augment.cutout} is larger than the {height}x{width} "
                                    f"images: it would erase whole images; use at most {min(height, width) // 2}")
        image_bytes = 4 * channels * height * width
        for key, sizes in (("eval.latency_batches", self.cfg.eval.latency_batches),
                           ("eval.batch_size", [self.cfg.eval.batch_size])):
            for size in sizes:
                if size * image_bytes > MAX_BATCH_BYTES:
                    raise KdistillError(f"{key}: a batch of {size} {channels}x{height}x{width} images takes "
                                        f"{size * image_bytes / 2**30:.1f} GiB; use at most "
                                        f"{MAX_BATCH_BYTES // image_bytes}")

    def _check_taps(self, student: nn.Module, teacher: nn.Module) -> None:
        """Tapped paths exist, and every feature term runs on the untrained models' features for two
        validation images: a wrong path or shape is one line now, not after the teacher's training."""
        objective = self.objective
        if not (objective.student_taps or objective.teacher_taps):
            return
        check_tap_paths(student, objective.student_taps, f"(the student, {self.specs['student'].name}) for "
                                                         "distill.losses")
        check_tap_paths(teacher, objective.teacher_taps, f"(the teacher, {self.specs['teacher'].name}) for "
                                                         "distill.losses")
        inputs = unpack(next(iter(self.loader("val"))))[0][:2].cpu()
        features = {}
        for role, model, paths in (("student", student, objective.student_taps),
                                   ("teacher", teacher, objective.teacher_taps)):
            taps = FeatureTaps(model, paths)
            try:
                with torch.no_grad():
                    logits = model.cpu().eval()(inputs)
                try:
                    features[role] = (logits, taps.pop())
                except ValueError as error:  # a tap whose output is no tensor
                    raise KdistillError(f"distill.losses ({role}): {error}") from None
            finally:
                taps.remove()
        trial = copy.deepcopy(objective).eval()  # a shape check: no memory bank update, nothing shared
        labels = torch.zeros(len(inputs), dtype=torch.long)
        for label, term in trial.terms.items():
            try:
                term.prepare(features["student"][1], features["teacher"][1])
                if term.needs_training_set:
                    term.bind_training_set(self.data.train.labels.long(), len(inputs))
                term(DistillInputs(features["student"][0], labels, features["teacher"][0], features["student"][1],
                                   features["teacher"][1], index=torch.arange(len(inputs))))
            except (ValueError, RuntimeError) as error:
                raise KdistillError(f"distill.losses.{label}: {error} (on the features of "
                                    f"{', '.join(term.student_taps + term.teacher_taps)}; `kdistill inspect` shows "
                                    "their shapes)") from None

    def _check_paths(self) -> None:
        checkpoint = self.cfg.teacher.checkpoint
        if checkpoint and not Path(checkpoint).is_file():
            raise KdistillError(f"teacher.checkpoint: {checkpoint} not found; give the path of a .safetensors file")
        if checkpoint:  # its format, architecture and values, before anything else is trained
            self.model("teacher")
        out_dir = Path(self.cfg.out_dir)
        for folder in (out_dir, *out_dir.parents, self.run_dir):
            if folder.exists() and not folder.is_dir():
                raise KdistillError(f"out_dir/name: {folder} is a file, not a folder; set out_dir= to a folder")

    def _check_cache_place(self) -> None:
        """Whether the soft-label cache could be made, without making it (for `kdistill check`)."""
        if not self.cached:
            return
        place = self.cache_dir
        while not place.exists() and place != place.parent:
            place = place.parent
        if not place.is_dir() or not os.access(place, os.W_OK):
            problem = "a file, not a folder" if not place.is_dir() else "not writable"
            raise KdistillError(f"distill.cache_dir: cannot store soft labels in {self.cache_dir} ({place} is "
                                f"{problem}); point distill.cache_dir (or $KDISTILL_CACHE_DIR) to a writable folder")

    @functools.cached_property
    def data_digest(self) -> str:
        return self.data.digest()

    @property
    def cache_dir(self) -> Path:
        return Path(self.cfg.distill.cache_dir).expanduser() if self.cfg.distill.cache_dir else default_cache_dir()

    # -- run folder ------------------------------------------------------------------------
    def _folder_verdict(self, discard: set[str]) -> set[str]:
        """The roles to throw away before working in the run folder; raises if kdistill must not work there.

        Writes nothing: `kdistill check` calls it alone, the commands under the folder's lock.
        """
        if not self.run_dir.is_dir():
            return set()
        self._check_folder_is_ours()
        changes = self._config_changes()  # (what changed, the roles it makes stale)
        recorded = self._read_json(self.run_dir / MARKER_FILE, "run record").get("data_digest")
        if recorded not in (None, self.data_digest):
            changes.append((f"data: {self.cfg.data.name} at data.root={self.cfg.data.root} is not the data this run "
                            "trained on", set(ROLES)))
        stale = {role for _, roles in changes for role in roles if self.done(role) or self._interrupted(role)}
        doomed = {r for role in discard for r in DEPENDENTS[role]}
        listed = "; ".join(what for what, _ in changes[:3]) + (" ..." if len(changes) > 3 else "")
        if "teacher" in stale and set(discard) != set(ROLES):  # only `run --force` redoes everything
            raise KdistillError(f"{self.run_dir} holds a run with another config or data ({listed}), which changes "
                                "the teacher: every step would be redone; pick another name=..., or start it over "
                                "with `kdistill run ... --force`")
        if stale - doomed and not self.trains:
            raise KdistillError(f"{self.run_dir}: {listed} since its models were trained; `kdistill run` retrains "
                                f"{_names(stale)} and keeps the rest")
        self.redo = {role: listed for role in stale - doomed}  # retrained because the config changed
        doomed |= stale
        for role in sorted(self.trains - doomed):
            if self._interrupted(role) and not self.resume:
                raise KdistillError(f"{self.role_dir(role)} holds an interrupted training: pass --resume to "
                                    "continue it or --force to start it over")
        return doomed

    def _check_folder_is_ours(self) -> None:
        run_dir = self.run_dir
        for path in (run_dir, *self._own_paths()):
            if path.is_symlink():
                raise KdistillError(f"{path} is a symbolic link: kdistill writes and deletes only its own files, "
                                    "never through links; remove the link")
        if not run_dir.is_dir():
            return
        if not (run_dir / MARKER_FILE).exists() and any(run_dir.iterdir()):
            raise KdistillError(f"{run_dir} exists and was not made by kdistill (no {MARKER_FILE}); pick another "
                                "name=... or out_dir=... (kdistill never writes into or clears a folder it did "
                                "not make)")
        scheme = self._read_json(run_dir / MARKER_FILE, "run record").get("scheme")
        if scheme not in (None, "offline"):
            raise KdistillError(f"{run_dir} holds a run of scheme {scheme}: pick another name=..., or run it with "
                                f"scheme={scheme}")
        for role in ROLES:
            if self.role_dir(role).exists() and not self.role_dir(role).is_dir():
                raise KdistillError(f"{self.role_dir(role)} is a file: kdistill keeps the {role}'s files in a folder "
                                    "of that name; move the file away")

    def _own_paths(self) -> list[Path]:
        """Every path kdistill writes in the run folder."""
        run_dir = self.run_dir
        paths = [run_dir / name for name in (MARKER_FILE, LOCK_FILE, CONFIG_FILE, *DERIVED_FILES)]
        for role in ROLES:
            paths += [self.role_dir(role), *(self.role_dir(role) / name for name in ROLE_FILES)]
        return paths

    def _claim_run_dir(self, discard: set[str]) -> None:
        """Make the folder ours (or check it is), lock it, and refuse to mix results of other configs or data."""
        run_dir = self.run_dir
        self._check_folder_is_ours()  # before writing the marker into it
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not (run_dir / MARKER_FILE).exists():
                self._write_marker({})
        except OSError as err:
            raise KdistillError(f"cannot write the run folder {run_dir} ({err.strerror or err}); "
                                "set out_dir= to a writable folder") from None
        self._stack.enter_context(exclusive_lock(run_dir / LOCK_FILE, f"run folder {run_dir}"))
        for folder in (run_dir, *(self.role_dir(role) for role in ROLES)):  # ours only, not the user's subfolders
            for stale in remove_stale_temporaries(folder, recursive=False):
                self.progress.line(f"removed {stale}, left by an interrupted write")
        roles = self._folder_verdict(discard)  # again, now that no other process can change the folder
        if self.redo:
            self.progress.line(f"config changed ({next(iter(self.redo.values()))}): retraining {_names(self.redo)}; "
                               f"keeping {_names(set(ROLES) - set(self.redo)) or 'nothing else'}")
        if roles:
            self._discard(roles)
        atomic_write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(self.cfg, resolve=True))
        self._write_marker({"data_digest": self.data_digest})

    def _write_marker(self, record: dict) -> None:
        atomic_write_text(self.run_dir / MARKER_FILE,
                          json.dumps({"made_by": "kdistill", "version": __version__, **record}, indent=2))

    def _config_changes(self) -> list[tuple[str, set[str]]]:
        """What differs from the config the folder's models were trained with, and the roles each change touches."""
        config_file = self.run_dir / CONFIG_FILE
        if not config_file.exists():
            trained = any(self.role_dir(role).exists() for role in ROLES)
            return [(f"{config_file} is missing, so what the models were trained with is unknown", set(ROLES))] \
                if trained else []
        try:
            keys = changed_keys(OmegaConf.create(config_file.read_text()), self.cfg)
        except Exception as err:  # noqa: BLE001  any parse or resolve failure means the same: we cannot trust it
            problem = str(err).splitlines()[0] if str(err) else type(err).__name__
            return [(f"{config_file} is unreadable ({problem})", set(ROLES))]
        return [(f"{key} changed", _roles_depending_on(key)) for key in keys]

    def _interrupted(self, role: str) -> bool:
        return (self.role_dir(role) / STATE_FILE).exists()

    def _discard(self, roles: set[str]) -> None:
        """Delete what kdistill made for `roles` (and the derived files): never a file of the user's, never a
        file the config points at."""
        doomed = [self.role_dir(role) / name for role in sorted(roles) for name in ROLE_FILES]
        doomed += [self.run_dir / name for name in DERIVED_FILES]
        checkpoint = self.cfg.teacher.checkpoint
        if checkpoint and Path(checkpoint).resolve() in {path.resolve() for path in doomed}:
            raise KdistillError(f"--force would delete teacher.checkpoint {checkpoint}, which is a file of this run "
                                "folder: copy it out of the run folder first")
        for path in doomed:
            path.unlink(missing_ok=True)
        for role in roles:
            with contextlib.suppress(OSError):  # kept if the user put files of theirs in it
                self.role_dir(role).rmdir()
        self._models = {r: m for r, m in self._models.items() if r not in roles}

    def _read_json(self, path: Path, what: str) -> dict:
        if not path.exists():
            return {}
        try:
            value = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            value = None
        if not isinstance(value, dict):
            raise KdistillError(f"{path} ({what}) is corrupt; delete it (and rerun the step that wrote it), "
                                "or pass --force to start the run over")
        return value

    def role_dir(self, role: str) -> Path:
        return self.run_dir / role

    def adopt(self, role: str, source: Path) -> None:
        """Take `source`, another run's folder of a model trained exactly as this run's `role` would be
        (same model, training, data and seed), as this run's `role`, unless it is done already."""
        target = self.role_dir(role)
        if self.done(role) or not (source / MODEL_FILE).exists():
            return
        partial = target.with_name(f"{role}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for name in ROLE_FILES:
            if name != STATE_FILE and (source / name).exists():
                shutil.copy2(source / name, partial / name)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
        self._models.pop(role, None)

    def done(self, role: str) -> bool:
        return (self.role_dir(role) / MODEL_FILE).exists()

    def summary(self, role: str) -> dict:
        path = self.role_dir(role) / "summary.json"
        summary = self._read_json(path, f"the {role}'s training summary")
        for key, value in summary.items():
            kind = SUMMARY_TYPES.get(key)
            if kind is not None and value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
                raise KdistillError(f"{path} ({role}'s training summary) is corrupt ({key} is {value!r}); delete the "
                                    f"{role} folder's model.safetensors to retrain it, or start over with --force")
        return summary

    def available(self, role: str) -> bool:
        """Trained already (or, for the teacher, given as a checkpoint)."""
        return self.done(role) or (role == "teacher" and bool(self.cfg.teacher.checkpoint))

    # -- data ------------------------------------------------------------------------------
    def loader(self, split: str, train_cfg=None, *, shard: bool = False, views: int = 0) -> BatchLoader:
        """Training loader (shuffled, augmented) when train_cfg is given, else an evaluation one.

        Batches are built on the run's device. A training loader, and an evaluation one with `shard`,
        gives this process its share of every batch under torchrun. `views` > 0: each sample takes
        one of that many fixed views of the student's augmentation (an evaluation loader: view by view).
        """
        data, cfg = self.data, self.cfg
        # "student": the distilled student's training set (the pool's chosen samples after the labelled ones);
        # "everything": the labelled samples and the whole pool (what the teacher's soft labels cover).
        images = with_pool(data, self.pool_rows) if split == "student" else with_pool(data) \
            if split == "everything" else getattr(data, split)
        where = {"device": self.device, "on_device": cfg.data.on_device, "views": views,
                 "num_classes": data.num_classes}
        if train_cfg is not None or shard:
            where.update(rank=distributed.rank(), world_size=distributed.world_size())
        if train_cfg is not None:
            return BatchLoader(images, train_cfg.batch_size, mean=data.mean, std=data.std,
                               shuffle=True, augment=augmentation(train_cfg), seed=cfg.seed, **where)
        return BatchLoader(images, cfg.eval.batch_size, mean=data.mean, std=data.std,
                           augment=augmentation(cfg.train) if views else None, **where)

    @property
    def cached(self) -> bool:
        """Whether the student learns from the soft-label cache (plain or views)."""
        return self.teacher_signal in ("cached", "cached_views")

    @property
    def views(self) -> int:
        """Views per sample in the teacher's table: distill.views with cached_views, else 0."""
        return self.cfg.distill.views if self.teacher_signal == "cached_views" else 0

    # -- models ----------------------------------------------------------------------------
    def build(self, role: str) -> nn.Module:
        spec = self.specs[role]
        key = "teacher" if role == "teacher" else "student"
        torch.manual_seed(self.cfg.seed)  # baseline and student start from the same weights
        kwargs = OmegaConf.to_container(spec.kwargs, resolve=True)
        model = create_model(spec.name, self.data.input_shape, self.data.num_classes, **kwargs)
        classes = output_classes(model, self.data.input_shape)
        if classes != self.data.num_classes:
            raise KdistillError(
                f"{key} '{spec.name}' outputs {classes} classes but {self.data.name} has {self.data.num_classes}: "
                "the teacher, the student and the data must agree"
            )
        return model

    def model(self, role: str) -> nn.Module:
        """The trained model of a role: in memory, from the run folder, or trained now."""
        if role in self._models:
            return self._models[role]
        model = self.build(role)
        external = self.cfg.teacher.checkpoint if role == "teacher" else None
        model.to(self.device)
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
                                "or --force to start it over")
        if role == "student":
            distiller = self._distiller(model)
        else:
            if role == "teacher" and train_cfg.label_smoothing > 0:
                warnings.warn("teacher.train.label_smoothing > 0 can erase the dark knowledge that distillation "
                              "transfers (Mueller et al. 2019): compare the distilled student with one taught by a "
                              "teacher trained without it", stacklevel=2)
            distiller = Distiller(None, model, cross_entropy_objective(train_cfg.label_smoothing), device=self.device)
        # A resumed distillation must go on from the same teacher and objective (a checkpoint file or the
        # teacher's code may have changed in between).
        loader = self.loader("student", train_cfg, views=self.views) if role == "student" else \
            self.loader("train", train_cfg)
        result = fit(distiller, loader, train_cfg, val_loader=self.loader("val", shard=True), out_dir=out,
                     resume=self.resume, seed=cfg.seed, progress=self.progress, label=role,
                     inputs=distiller.fingerprint(loader))
        if not self.main:
            return
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
        for name in DERIVED_FILES:  # they describe the models as they were
            (self.run_dir / name).unlink(missing_ok=True)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        save_model(out / MODEL_FILE, model, {"model": self.specs[role].name})
        (out / STATE_FILE).unlink(missing_ok=True)

    # -- teacher signal --------------------------------------------------------------------
    def _check_same_teacher(self) -> None:
        """A distilled student is only reused with the teacher it was distilled from."""
        summary = self.summary("student")
        if summary.get("teacher_weights") not in (None, weights_digest(self.model("teacher"))):
            raise KdistillError(f"{self.role_dir('student')} was distilled from another teacher than this run's; "
                                "retrain it with `kdistill distill --force`, or start over with `kdistill run --force`")

    def soft_labels(self, views: int | None = None) -> tuple[torch.Tensor | TopKLogits, Path, bool, float]:
        """The teacher's logits for every training sample, the unlabelled pool's after the labelled ones (for each
        of its `views`, default the student's, with cached_views): cached on disk, built if missing."""
        started = time.perf_counter()
        # In order; unaugmented (the same preprocessing as evaluation), or view by view; sharded by rank.
        loader = self.loader("everything", shard=True, views=self.views if views is None else views)
        teacher_config = OmegaConf.to_yaml({"name": self.cfg.teacher.name, "kwargs": self.cfg.teacher.kwargs},
                                           resolve=True)
        teacher = self.model("teacher")
        # Under torchrun every process runs the teacher on its share of each batch; rank 0 stores the entry.
        logits, path, built = cached_teacher_logits(
            teacher, loader, loader.data.images, loader.preprocessing, self.cache_dir,
            teacher_config=teacher_config, top_k=self.cfg.distill.top_k, log=self.progress.line,
            main=distributed.is_main(), total=distributed.sum_ if distributed.active() else None)
        return logits, path, built, time.perf_counter() - started

    def teacher_features(self, logits_key: str, *, rebuild: bool) -> dict[str, torch.Tensor] | None:
        """The teacher's outputs at the tapped modules for every training sample (memory-mapped), beside soft-label
        entry `logits_key`: built if missing, or if `rebuild` (its soft labels were); None when nothing is tapped
        or the student's teacher signal is not a cached one."""
        if not (self.cached and self.objective.teacher_taps):
            return None
        started = time.perf_counter()
        features, files, built = cached_teacher_features(
            self.model("teacher"), self.loader("train"), logits_key, self.objective.teacher_taps,
            len(self.data.train), self.cache_dir, rebuild=rebuild, log=self.progress.line)
        size = sum(f.stat().st_size for f in files) / 2**20
        self.progress.line(f"[student] teacher features ({', '.join(features)}; {size:,.0f} MiB, memory-mapped) "
                           f"{'computed and stored' if built else 'loaded'} in "
                           f"{time.perf_counter() - started:.1f}s: {files[0].parent}")
        return features

    def _distiller(self, student: nn.Module) -> Distiller:
        signal = self.teacher_signal
        self.progress.line(f"[student] teacher signal: {signal} ({self.signal_reason})")
        soft_labels = features = None
        if self.cached:
            soft_labels, path, built, seconds = self.soft_labels()
            verb = "computed and stored" if built else "loaded"
            what = f"{self.views} views of each sample" if self.views else "each sample"
            self.progress.line(f"[student] soft labels ({what}) {verb} in {seconds:.1f}s: {path}")
            features = self.teacher_features(path.stem, rebuild=built)
        if self.data.unlabelled is not None:
            soft_labels = self._choose_from_pool(soft_labels)
        teacher = self.model("teacher") if signal == "live" else None
        distiller = Distiller(teacher, student, self.objective, soft_labels=soft_labels, teacher_features=features,
                              device=self.device)
        distiller.warn_if_teacher_untrained(self.loader("train"))
        return distiller

    def _choose_from_pool(self, table):
        """Pick the pool samples the student learns from by the teacher's logits on them, unaugmented
        (`distill.pseudo_labels`), and cut the student's soft-label `table` (if cached) down to its samples."""
        plain = table if self.teacher_signal == "cached" else self.soft_labels(views=0)[0]
        labelled, pool = len(self.data.train), len(self.data.unlabelled)
        logits = plain[torch.arange(labelled, labelled + pool)]  # dense rows, from a TopKLogits table too
        choice = self.cfg.distill.pseudo_labels
        self.pool_rows, said = select_pseudo_labelled(logits, choice.min_confidence, choice.balance)
        self.progress.line(f"[student] {len(self.data.train):,} labelled samples and {said}")
        if table is None:
            return None
        kept = torch.cat([torch.arange(labelled), labelled + self.pool_rows])
        return table_subset(table, kept, labelled + pool, self.views)

    # -- evaluation and report -------------------------------------------------------------
    def evaluate(self) -> dict:
        """Evaluate every trained model once on the test set; writes metrics.json."""
        cfg = self.cfg
        if not self.available("teacher"):
            raise KdistillError(f"no trained teacher in {self.run_dir}: run `kdistill train` first "
                                "or set teacher.checkpoint")
        entrants = {role: self.entrant(role) for role in ROLES if self.available(role)}
        metrics, correct = compare_models(entrants, self.loader("test"), self.loader("val"), self.data,
                                          cfg.eval, self.device)
        if {"teacher", "baseline", "student"} <= metrics.keys():
            metrics["gap_recovered"], metrics["gap_recovered_note"] = gap_recovered(
                correct["teacher"], correct["baseline"], correct["student"])
            baseline_epoch = self.summary("baseline").get("median_epoch_seconds")
            student_epoch = self.summary("student").get("median_epoch_seconds")
            if baseline_epoch and student_epoch:
                metrics["distill_overhead"] = student_epoch / baseline_epoch
            metrics["teacher_signal"] = self.summary("student").get("teacher_signal")
        atomic_write_text(self.run_dir / "metrics.json", json.dumps(metrics, indent=2))
        return metrics

    def entrant(self, role: str, title: str | None = None) -> Entrant:
        """A role's model for `compare_models`, with its file and how it was trained (and a row title)."""
        summary = self.summary(role)
        info = {"model": self.specs[role].name, **({"title": title} if title else {}),
                **{key: summary.get(key) for key in TRAINING_FIGURES}}
        return Entrant(self.model(role), self.checkpoint_path(role), info)

    def checkpoint_path(self, role: str) -> Path:
        """The file a role's weights are read from: the run folder's, or the teacher checkpoint given."""
        if role == "teacher" and self.cfg.teacher.checkpoint:
            return Path(self.cfg.teacher.checkpoint)
        return self.role_dir(role) / MODEL_FILE

    def report(self, metrics: dict | None = None) -> str:
        if metrics is None:
            path = self.run_dir / "metrics.json"
            if not path.exists():
                raise KdistillError(f"{path} not found: run `kdistill eval` (or `kdistill run`) first")
            metrics = self._read_json(path, "test metrics")
            self._check_current(metrics)
        try:
            table = comparison_table(metrics)
            write_report(self.run_dir, metrics, OmegaConf.to_yaml(self.cfg, resolve=True))
        except (KeyError, TypeError, ValueError, AttributeError):  # hand-edited into another shape
            raise KdistillError(f"{self.run_dir / 'metrics.json'} is not kdistill's metrics file; "
                                "rerun `kdistill eval`") from None
        return table

    def _check_current(self, metrics: dict) -> None:
        """metrics.json describes the models whose files it recorded; refuse to report on others."""
        for role in ROLES:
            recorded = metrics.get(role, {}).get("checkpoint_sha256") if isinstance(metrics.get(role), dict) else None
            if recorded is None:
                continue
            checkpoint = self.checkpoint_path(role)
            if not checkpoint.is_file() or file_digest(checkpoint) != recorded:
                raise KdistillError(f"metrics.json describes a {role} whose weights ({checkpoint}) have changed since; "
                                    "run `kdistill eval` to measure the models as they are")

    def run(self) -> dict:
        """Train what is missing, evaluate, report; returns the metrics (empty on processes other than rank 0)."""
        for role in ROLES:
            self.model(role)
        if not self.main:
            return {}
        metrics = self.evaluate()
        self.report(metrics)
        return metrics

    # -- description ---------------------------------------------------------------------
    def describe(self) -> str:
        """What `run` would do, in a few lines (`kdistill check`)."""
        cfg, data = self.cfg, self.data
        lines = [
            f"run folder: {self.run_dir} "
            f"({', '.join(f'{r} done' for r in ROLES if self.done(r)) or 'nothing trained yet'})",
            f"data: {data.describe()}",
        ]
        if self.redo:
            lines.append(f"config changed ({next(iter(self.redo.values()))}): `run` retrains {_names(self.redo)}, "
                         f"keeps {_names({r for r in ROLES if self.done(r)} - set(self.redo)) or 'nothing else'}")
        for role in ("teacher", "student"):
            spec = self.specs[role]
            source = f"loaded from {spec.checkpoint}" if role == "teacher" and cfg.teacher.checkpoint else \
                f"{(cfg.teacher.train if role == 'teacher' else cfg.train).epochs} epochs"
            lines.append(f"{role}: {spec.name} {OmegaConf.to_container(spec.kwargs) or ''}".rstrip()
                         + f", {count_parameters(self.build(role)):,} parameters, {source}")
        processes = distributed.world_size()
        lines.append(f"device: {device_name(self.device)} (device={cfg.device})"
                     + (f", {processes} processes" if processes > 1 else "")
                     + f"; precision: teacher {cfg.teacher.train.precision}, students {cfg.train.precision}")
        terms = " + ".join(f"{w:g} {label}" for label, w in self.objective.weights.items())
        views = f", {self.views} views of each sample" if self.views else ""
        lines.append(f"objective: {terms}; teacher signal: {self.teacher_signal} ({self.signal_reason}{views})"
                     + (f"; cache: {self.cache_dir}" if self.cached else ""))
        return "\n".join(lines)


def _roles_depending_on(key: str) -> set[str]:
    """The models a changed config key makes stale: a teacher key the teacher and the distilled student,
    a student or training key both students, a distillation key the distilled student; anything else all."""
    if key.startswith("teacher."):
        return set(DEPENDENTS["teacher"])
    if key.startswith(("student.", "train.")):
        return {"baseline", "student"}
    if key.startswith("distill."):
        return {"student"}
    return set(ROLES)


def _names(roles: Collection[str]) -> str:
    return " and ".join(role for role in ROLES if role in roles)


def _check_batch_split(batch_size: int, key: str) -> None:
    """Each process needs at least one sample of every global batch."""
    processes = distributed.world_size()
    if batch_size < processes:
        raise KdistillError(f"{key}={batch_size} is the global batch, split across {processes} processes: it must "
                            f"be at least {processes}; raise it or start fewer processes")


def _check_trainable(model: nn.Module, what: str, input_shape) -> None:
    """A model kdistill will train must have trainable parameters that its output depends on: found now,
    not as an optimizer error after the teacher's training."""
    if not any(p.requires_grad for p in model.parameters()):
        raise KdistillError(f"{what} has no trainable parameters: give it some, or load a trained one "
                            "(teacher.checkpoint)")
    first = next(p for p in model.parameters() if p.requires_grad)
    modes = {module: module.training for module in model.modules()}
    model.eval()  # leaves BatchNorm statistics alone
    try:
        with torch.enable_grad():
            output = model(torch.zeros(2, *input_shape, device=first.device, dtype=first.dtype))
    finally:
        for module, training in modes.items():
            module.training = training
    if not output.requires_grad:
        raise KdistillError(f"{what} returns outputs that do not depend on its parameters (detached, or computed "
                            "under no_grad): kdistill cannot train it")


def recipe_data(cfg: DictConfig):
    """The recipe's data, loaded and split (`data.*`), with its unlabelled pool if it names one."""
    data = cfg.data
    splits = load_data(data.name, data.root, data.val_size, data.split_seed, data.download, channels=data.channels,
                       image_size=data.image_size, test_size=data.test_size, max_val_size=data.max_val_size)
    if data.labelled_fraction < 1:
        splits = withhold_labels(splits, data.labelled_fraction, data.split_seed)
    other = data.unlabelled
    if other.name:
        try:
            pool = load_data(other.name, other.root, 1, data.split_seed, data.download, channels=data.channels,
                             image_size=data.image_size, max_val_size=None)
        except KdistillError as error:
            raise KdistillError(f"data.unlabelled: {error}") from None
        images = torch.cat([pool.train.images, pool.val.images])
        if other.max_size is not None and other.max_size < len(images):
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(data.split_seed))
            images = images[order[:other.max_size].sort().values]
        splits = add_pool(splits, images, f"{len(images):,} unlabelled images of {pool.name}")
    return splits


def recipe_objective(cfg: DictConfig) -> Objective:
    """The recipe's loss terms, built (their connectors still shapeless)."""
    return build_objective(cfg.distill.losses, cfg.distill.temperature, cfg.distill.normalize_weights,
                           cfg.train.label_smoothing, cfg.train.epochs)


def resolve_teacher_signal(cfg: DictConfig, objective: Objective) -> tuple[str, str]:
    """(signal, why) the recipe's student gets: distill.teacher_signal resolved, or "none"."""
    if not objective.needs_teacher:
        return "none", "no loss term reads the teacher"
    pool = cfg.data.labelled_fraction < 1 or cfg.data.unlabelled.name
    if pool and objective.teacher_taps:  # features are cached for the training split only
        if cfg.distill.teacher_signal not in ("auto", "live"):
            raise KdistillError(f"distill.teacher_signal={cfg.distill.teacher_signal}: the loss terms read the "
                                "teacher's features, which are not cached for an unlabelled pool; use live (or auto)")
        return "live", "the loss terms read the teacher's features, on an unlabelled pool too"
    return choose_teacher_signal(cfg.distill.teacher_signal, augmentation(cfg.train), bool(objective.teacher_taps),
                                 processes=int(os.environ.get("WORLD_SIZE", "1")))


def augmentation(train_cfg) -> Augment | None:
    """The Augment of a model's training batches (None when every augmentation is off)."""
    options = OmegaConf.to_container(train_cfg.augment, resolve=True)
    augment = Augment(**{**options, "resized_crop": None if options["resized_crop"] is None
                         else tuple(options["resized_crop"])})
    return augment if augment.enabled else None


# Keys that change where or how fast things run, not what a run computes. data.root is here
# because the data's digest is compared instead; threads because a resume checks it itself.
NEUTRAL_KEYS = ("out_dir", "threads", "device", "data.root", "data.download", "data.on_device", "distill.cache_dir",
                "eval.", "compress.", *(f"{train}.{key}" for train in ("train", "teacher.train")
                           for key in ("log_every_steps", "checkpoint_every_steps", "compile")))
# The other schemes' sections: an offline run (a scheme's part too) does not read them.
SCHEME_SECTIONS = ("online.", "self_distill.", "multi_teacher.", "assistant.", "noisy_student.")


@functools.cache
def _schema_defaults() -> dict:
    from kdistill.config.schema import RunConfig

    return flatten(OmegaConf.to_container(OmegaConf.structured(RunConfig), resolve=True))


def changed_keys(old: DictConfig, new: DictConfig) -> list[str]:
    """The config keys whose values differ, leaving out NEUTRAL_KEYS; and the teacher's training keys when
    both load the same teacher checkpoint (it is loaded, not trained: a recipe's new teacher schedule
    changes nothing there)."""
    # A key added to kdistill after `old` was written takes its default there: new keys default to the
    # behaviour from before they existed, so a run folder made by an older version stays usable.
    defaults = _schema_defaults()
    flat_old = {**defaults, **flatten(OmegaConf.to_container(old, resolve=True))}
    flat_new = {**defaults, **flatten(OmegaConf.to_container(new, resolve=True))}
    neutral = NEUTRAL_KEYS
    if flat_old["scheme"] == flat_new["scheme"] == "offline":
        neutral += SCHEME_SECTIONS
    if flat_old.get("teacher.checkpoint") and flat_old.get("teacher.checkpoint") == flat_new.get("teacher.checkpoint"):
        neutral += ("teacher.train.",)
    return sorted(k for k in flat_old.keys() | flat_new.keys()
                  if flat_old.get(k) != flat_new.get(k) and not k.startswith(neutral))
