"""Loss terms and the objective built from config; the maths lives in kdistill.functional."""

from __future__ import annotations

import difflib
import inspect
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
    "SoftCrossEntropy", "TangInterpolation", "build_objective", "check_loss_specs",
    "cross_entropy_objective", "register_loss",
]


def build_objective(
    specs: Mapping[str, Any], default_temperature: float = 4.0, normalize: bool = False
) -> Objective:
    """Build an Objective from `{label: {type, weight, **params}}` (the `distill.losses` config).

    `type` defaults to the label, `weight` to 1; a term that takes a temperature and is not
    given one gets `default_temperature`. Raises KdistillError naming the offending key.
    """
    if isinstance(specs, DictConfig):
        specs = OmegaConf.to_container(specs, resolve=True)
    terms, weights = {}, {}
    for label, spec in specs.items():
        key = f"distill.losses.{label}"
        spec = dict(spec or {})
        type_name = spec.pop("type", label)
        if type_name not in LOSSES:
            close = difflib.get_close_matches(str(type_name), LOSSES, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"registered: {', '.join(LOSSES)}"
            raise KdistillError(f"{key}: unknown loss '{type_name}'; {hint} (set `type:` for a custom label)")
        weight = spec.pop("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
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
        if "temperature" in accepted and "temperature" not in spec:
            spec["temperature"] = default_temperature
        try:
            terms[label] = cls(**spec)
        except ValueError as err:
            raise KdistillError(f"{key}: {err}") from None
        weights[label] = float(weight)
    try:
        return Objective(terms, weights, normalize)
    except ValueError as err:
        raise KdistillError(f"distill.losses: {err}") from None


def check_loss_specs(specs: Mapping[str, Any], default_temperature: float) -> None:
    """Validate a `distill.losses` config without keeping the result."""
    build_objective(specs, default_temperature)


def _check_type(key: str, value: Any, param: inspect.Parameter) -> None:
    expected = param.annotation if param.annotation is not inspect.Parameter.empty else None
    if expected in (float, "float") and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise KdistillError(f"{key}: must be a number, got {value!r}")
    if expected in (int, "int") and not (isinstance(value, int) and not isinstance(value, bool)):
        raise KdistillError(f"{key}: must be an integer, got {value!r}")
    if expected in (bool, "bool") and not isinstance(value, bool):
        raise KdistillError(f"{key}: must be true or false, got {value!r}")
