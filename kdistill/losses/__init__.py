"""Loss terms and the objective built from config; the maths lives in kdistill.functional."""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from kdistill.errors import KdistillError
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
    cross_entropy_objective,
    register_loss,
)

__all__ = [
    "LOSSES", "KD", "CrossEntropy", "DistillInputs", "LogitMSE", "LossTerm", "Objective",
    "SoftCrossEntropy", "TangInterpolation", "DEFAULT_LOSSES", "build_objective",
    "cross_entropy_objective", "register_loss",
]

# Seed 000's objective, alpha = 0.5: 0.5 * CE + 0.5 * KD.
DEFAULT_LOSSES = {"ce": {"weight": 0.5}, "kd": {"weight": 0.5}}


def build_objective(
    specs: Mapping[str, Any], default_temperature: float = 4.0, normalize: bool = False,
    default_label_smoothing: float = 0.0,
) -> Objective:
    """Build an Objective from `{label: {type, weight, **params}}` (the `distill.losses` config).

    `type` defaults to the label, `weight` to 1. A term that takes a temperature (a label
    smoothing) and is not given one gets `default_temperature` (`default_label_smoothing`, so
    that a distilled student's CE matches its baseline's). Raises KdistillError naming the key.
    """
    if isinstance(specs, DictConfig):
        specs = OmegaConf.to_container(specs, resolve=True)
    terms, weights = {}, {}
    for label, spec in specs.items():
        key = f"distill.losses.{label}"
        if spec is not None and not isinstance(spec, Mapping):
            raise KdistillError(f"{key}: must be a mapping like {{weight: 0.5}}, got {spec!r}")
        spec = dict(spec or {})
        type_name = spec.pop("type", label)
        if type_name not in LOSSES:
            close = difflib.get_close_matches(str(type_name), LOSSES, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"registered: {', '.join(LOSSES)}"
            raise KdistillError(f"{key}: unknown loss '{type_name}'; {hint} (set `type:` for a custom label)")
        weight = spec.pop("weight", 1.0)
        if not _is_number(weight) or weight < 0:
            raise KdistillError(f"{key}.weight: must be a number >= 0, got {weight!r}")
        cls = LOSSES[type_name].cls
        params = inspect.signature(cls.__init__).parameters
        accepted = [p for p in params if p != "self"]
        for name, value in spec.items():
            if name not in accepted:
                close = difflib.get_close_matches(name, accepted + ["type", "weight"], n=1)
                hint = f"did you mean {key}.{close[0]}?" if close else (
                    f"'{type_name}' takes: {', '.join(['type', 'weight', *accepted])}")
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
    try:
        return Objective(terms, weights, normalize)
    except ValueError as err:
        raise KdistillError(f"distill.losses: {err}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_type(key: str, value: Any, param: inspect.Parameter) -> None:
    expected = param.annotation if param.annotation is not inspect.Parameter.empty else None
    if expected in (float, "float") and not _is_number(value):
        raise KdistillError(f"{key}: must be a finite number, got {value!r}")
    if expected in (int, "int") and not (isinstance(value, int) and not isinstance(value, bool)):
        raise KdistillError(f"{key}: must be an integer, got {value!r}")
    if expected in (bool, "bool") and not isinstance(value, bool):
        raise KdistillError(f"{key}: must be true or false, got {value!r}")
