"""Checks for builder arguments, which arrive untyped from YAML: a bad value names the model and argument."""

from typing import Any

from kdistill.errors import KdistillError


def positive_int(model: str, arg: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KdistillError(f"model {model!r}: {arg} must be a positive integer, got {value!r}")
    return value


def positive_ints(model: str, arg: str, value: Any) -> list[int]:
    """A list of positive integers; a single integer means a list of one."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    try:
        values = list(value)  # OmegaConf hands lists over as ListConfig
    except TypeError:
        values = None
    if values is None or isinstance(value, str) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise KdistillError(f"model {model!r}: {arg} must be a list of positive integers such as [800, 800], "
                            f"got {value!r}")
    return values


def probability(model: str, arg: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise KdistillError(f"model {model!r}: {arg} must be a number in [0, 1), got {value!r}")
    return float(value)
