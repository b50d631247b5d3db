"""Recipe + overrides -> a validated, read-only config; every mistake becomes one clear line."""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from kdistill.config.schema import RunConfig, TrainConfig
from kdistill.errors import KdistillError
from kdistill.losses import DEFAULT_LOSSES, build_objective


def load_config(recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Merge the schema defaults, a YAML recipe and `key=value` overrides, then validate.

    Raises KdistillError (one line: the key, what is wrong, the closest valid key for a typo).
    """
    layers = []
    if recipe is not None:
        layers.append(_read_recipe(Path(recipe)))
    layers.append(_parse_overrides(overrides))
    cfg = OmegaConf.structured(RunConfig)
    for layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise _explain(err, cfg) from None
    try:
        if not cfg.distill.losses:
            cfg.distill.losses = DEFAULT_LOSSES
        OmegaConf.to_container(cfg, resolve=True)  # ${interpolations} that do not resolve
        validate(cfg)
    except OmegaConfBaseException as err:
        raise _explain(err, cfg) from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _read_recipe(path: Path) -> DictConfig:
    if not path.is_file():
        raise KdistillError(f"recipe {path} not found: give the path of a YAML file (see recipes/)")
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise KdistillError(f"recipe {path}{line} is not valid YAML: fix its syntax") from None
    if not isinstance(loaded, DictConfig):
        raise KdistillError(f"recipe {path} must be a YAML mapping of keys to values")
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise KdistillError(f"override '{item}' is not key=value (example: distill.temperature=8)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise KdistillError(f"cannot parse overrides {list(overrides)}: {err}") from None


def _explain(err: OmegaConfBaseException, cfg: DictConfig) -> KdistillError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        parent_path, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_path) if parent_path else cfg
        valid = [str(k) for k in parent.keys()] if isinstance(parent, DictConfig) else []
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f"did you mean {_join(parent_path, close[0])}?" if close else (
            f"valid keys here: {', '.join(valid)}" if valid else "")
        return KdistillError(f"{key}: unknown key; {hint}".rstrip("; "))
    if isinstance(err, ValidationError):
        first_line = str(err).splitlines()[0]
        return KdistillError(f"{key}: wrong type: {first_line}")
    return KdistillError(f"{key}: {str(err).splitlines()[0]}")


def _join(parent: str, leaf: str) -> str:
    return f"{parent}.{leaf}" if parent else leaf


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise KdistillError(f"{key}: {message}")


def check_training(train: DictConfig, prefix: str) -> None:
    _check(train.epochs >= 1, f"{prefix}.epochs", f"must be >= 1, got {train.epochs}")
    _check(train.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {train.batch_size}")
    _check(0 < train.lr < math.inf, f"{prefix}.lr", f"must be > 0 and finite, got {train.lr}")
    _check(train.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
    _check(0 <= train.momentum < 1, f"{prefix}.momentum", "must be in [0, 1)")
    _check(train.warmup_epochs >= 0, f"{prefix}.warmup_epochs", "must be >= 0")
    _check(train.step_epochs >= 1, f"{prefix}.step_epochs", "must be >= 1")
    _check(0 < train.step_gamma <= 1, f"{prefix}.step_gamma", "must be in (0, 1]")
    _check(train.grad_clip is None or train.grad_clip > 0, f"{prefix}.grad_clip", "must be > 0 or null")
    _check(0 <= train.label_smoothing < 1, f"{prefix}.label_smoothing", "must be in [0, 1)")
    _check(train.augment.crop_padding >= 0, f"{prefix}.augment.crop_padding", "must be >= 0")
    _check(train.early_stop_patience is None or train.early_stop_patience >= 1,
           f"{prefix}.early_stop_patience", "must be >= 1 or null")
    for key, allowed in (("optimizer", ("sgd", "adam", "adamw")),
                         ("schedule", ("none", "cosine", "step")),
                         ("precision", ("fp32", "bf16"))):
        value = train[key]
        _check(value in allowed, f"{prefix}.{key}",
               f"'{value}' is not one of {', '.join(allowed)}")


def validate(cfg: DictConfig) -> None:
    """Range checks OmegaConf's types cannot express; raises KdistillError naming the key."""
    check_training(cfg.train, "train")
    check_training(cfg.teacher.train, "teacher.train")
    _check(cfg.data.val_size >= 1, "data.val_size", "must be >= 1 (model selection needs a validation split)")
    _check(0 < cfg.distill.temperature < math.inf, "distill.temperature",
           f"must be > 0 and finite, got {cfg.distill.temperature}")
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    _check(cfg.eval.latency_repeats >= 1, "eval.latency_repeats", "must be >= 1")
    _check(all(b >= 1 for b in cfg.eval.latency_batches), "eval.latency_batches", "sizes must be >= 1")
    _check(cfg.threads is None or cfg.threads >= 1, "threads", "must be >= 1 or null")
    _check("/" not in cfg.name and cfg.name not in ("", ".", ".."), "name",
           f"'{cfg.name}' must be a plain folder name")
    # Loss terms are checked against their registered signatures.
    build_objective(cfg.distill.losses, cfg.distill.temperature, cfg.distill.normalize_weights,
                    cfg.train.label_smoothing)


def train_config(**options) -> DictConfig:
    """A validated TrainConfig from keyword arguments (for the Python API)."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), options)
    except OmegaConfBaseException as err:
        raise _explain(err, OmegaConf.structured(TrainConfig)) from None
    check_training(cfg, "train")
    return cfg

