"""Loss terms and the objective built from config; the maths lives in kdistill.functional."""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdistill.errors import KdistillError
from kdistill.losses.features import Connector
from kdistill.losses.response import DIST, DKD, JensenShannon, LogitStandardizedKD, ReverseKD
from kdistill.losses.terms import (
    KD,
    LOSSES,
    CrossEntropy,
    DistillInputs,
    LogitMSE,
    LossTerm,
    Objective,
    SoftCrossEntropy,
    TangInterpolation,
    TermSchedule,
    cross_entropy_objective,
    register_loss,
)

__all__ = [
    "Connector", "DIST", "DKD", "JensenShannon", "LogitStandardizedKD", "ReverseKD",
    "LOSSES", "KD", "CrossEntropy", "DistillInputs", "LogitMSE", "LossTerm", "Objective",
    "SoftCrossEntropy", "TangInterpolation", "TermSchedule", "DEFAULT_LOSSES", "build_objective",
    "cross_entropy_objective", "register_loss",
]

# Seed 000's objective, alpha = 0.5: 0.5 * CE + 0.5 * KD.
DEFAULT_LOSSES = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5}}


# Loss weights beyond this are typos (a loss scaled by 1e300 overflows); normalize_weights handles any ratio.
MAX_WEIGHT = 10**6
# A label becomes a key of an nn.ModuleDict: it cannot shadow one of its attributes.
_RESERVED_LABELS = frozenset(dir(nn.ModuleDict()))


def build_objective(
    specs: Mapping[str, Any], default_temperature: float = 4.0, normalize: bool = False,
    default_label_smoothing: float = 0.0, epochs: int | None = None,
) -> Objective:
    """Build an Objective from `{label: {type, weight, **params}}` (the `distill.losses` config).

    `type` defaults to the label, `weight` to 1; a label set to None (YAML null) removes that term.
    Any term also takes `from_epoch`, `until_epoch` and `warmup_epochs` (a `TermSchedule`); given the
    training's `epochs`, every epoch must keep a term.
    A term that takes a temperature (a label smoothing) and is not given one gets `default_temperature`
    (`default_label_smoothing`, so that a distilled student's CE matches its baseline's). Raises
    KdistillError naming the key.
    """
    if isinstance(specs, DictConfig):
        specs = OmegaConf.to_container(specs, resolve=True)
    terms, weights, schedules = {}, {}, {}
    for label, spec in specs.items():
        key = f"distill.losses.{label}"
        if spec is None:  # null removes a term a recipe (or the default) put there
            continue
        if not isinstance(label, str) or not label or "." in label or label in _RESERVED_LABELS:
            raise KdistillError(f"{key}: {label!r} cannot label a loss term (empty, with a dot, or a reserved "
                                "name); pick another label and set `type:`")
        if not isinstance(spec, Mapping):
            raise KdistillError(f"{key}: must be a mapping like {{weight: 0.5}} (or null to remove it), got {spec!r}")
        spec = dict(spec)
        type_name = spec.pop("type", label)
        if not isinstance(type_name, str):
            raise KdistillError(f"{key}.type: must be the name of a registered loss ({', '.join(LOSSES)}), "
                                f"got {type_name!r}")
        if type_name not in LOSSES:
            close = difflib.get_close_matches(type_name, LOSSES, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"registered: {', '.join(LOSSES)}"
            raise KdistillError(f"{key}: unknown loss '{type_name}'; {hint} (set `type:` for a custom label)")
        weight = spec.pop("weight", 1.0)
        if not is_number(weight) or not 0 <= weight <= MAX_WEIGHT:
            raise KdistillError(f"{key}.weight: must be a number >= 0 and <= {MAX_WEIGHT}, got {weight!r}")
        schedules[label] = _schedule(key, spec)
        cls = LOSSES[type_name].cls
        params = inspect.signature(cls.__init__).parameters
        accepted = [p for p in params if p != "self"]
        for name, value in spec.items():
            if name not in accepted:
                close = difflib.get_close_matches(str(name), accepted + ["type", "weight"], n=1)
                hint = f"did you mean {key}.{close[0]}?" if close else (
                    f"'{type_name}' takes: {', '.join(['type', 'weight', *accepted, *SCHEDULE_KEYS])}")
                raise KdistillError(f"{key}.{name}: unknown key; {hint}")
            _check_type(f"{key}.{name}", value, params[name])
        for name, default in (("temperature", default_temperature), ("label_smoothing", default_label_smoothing)):
            if name in accepted and name not in spec:
                spec[name] = default
        try:
            terms[label] = cls(**spec)
        except ValueError as err:
            raise KdistillError(f"{key}: {err}") from None
        weights[label] = float(weight)
    if not terms:
        removed = " (a null term is removed)" if specs else ""
        raise KdistillError(f"distill.losses: no loss term left{removed}; keep at least one, "
                            "e.g. distill.losses.kd.weight=1")
    try:
        objective = Objective(terms, weights, normalize, schedules)
        if epochs is not None:
            objective.check_epochs(epochs)
        return objective
    except ValueError as err:
        raise KdistillError(f"distill.losses: {err}") from None


SCHEDULE_KEYS = ("from_epoch", "until_epoch", "warmup_epochs")


def _schedule(key: str, spec: dict) -> TermSchedule:
    """Pop a term's epoch window and warm-up from its spec, checked."""
    first = spec.pop("from_epoch", 1)
    last = spec.pop("until_epoch", None)
    warmup = spec.pop("warmup_epochs", 0)
    for name, value in (("from_epoch", first), ("until_epoch", last)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise KdistillError(f"{key}.{name}: must be an epoch number >= 1 (the first epoch is 1), got {value!r}")
    if last is not None and last < first:
        raise KdistillError(f"{key}: until_epoch ({last}) comes before from_epoch ({first}): the term would never "
                            "count")
    if not is_number(warmup) or not 0 <= warmup <= 100_000:
        raise KdistillError(f"{key}.warmup_epochs: must be a number of epochs >= 0, got {warmup!r}")
    return TermSchedule(first, last, float(warmup))


def is_number(value: Any) -> bool:
    """A finite int or float; not a bool. (An int is always finite: math.isfinite would overflow on a huge one.)"""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _check_type(key: str, value: Any, param: inspect.Parameter) -> None:
    expected = param.annotation if param.annotation is not inspect.Parameter.empty else None
    if expected in (float, "float") and not is_number(value):
        raise KdistillError(f"{key}: must be a finite number, got {value!r}")
    if expected in (int, "int") and not (isinstance(value, int) and not isinstance(value, bool)):
        raise KdistillError(f"{key}: must be an integer, got {value!r}")
    if expected in (bool, "bool") and not isinstance(value, bool):
        raise KdistillError(f"{key}: must be true or false, got {value!r}")
