"""Checks for builder arguments, which arrive untyped from YAML: a bad value names the model and argument.

Sizes are bounded so that a typo (`hidden: [1000000000]`) is refused before anything is allocated.
"""

from typing import Any

from kdistill.errors import KdistillError
from kdistill.memory import available_memory

MAX_WIDTH = 2 ** 20  # channels or units in one layer; far above any model that trains on one machine
MAX_DEPTH = 1000  # layers, blocks per stage, or stages


def positive_int(model: str, arg: str, value: Any, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise KdistillError(f"model {model!r}: {arg} must be a positive integer at most {most}, got {value!r}")
    return value


def positive_ints(model: str, arg: str, value: Any, most: int, most_items: int = MAX_DEPTH) -> list[int]:
    """A list of positive integers; a single integer means a list of one."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    try:
        values = list(value)  # OmegaConf hands lists over as ListConfig
    except TypeError:
        values = None
    if values is None or isinstance(value, str) or len(values) > most_items or not all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= most for v in values):
        raise KdistillError(f"model {model!r}: {arg} must be a list of positive integers (at most {most_items} of "
                            f"them, each at most {most}) such as [800, 800], got {value!r}")
    return values


def probability(model: str, arg: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise KdistillError(f"model {model!r}: {arg} must be a number in [0, 1), got {value!r}")
    return float(value)


def fits_in_memory(model: str, parameters: int) -> None:
    """Refuse a model whose float32 parameters alone would not fit in the memory left.

    Checked before building: allocations are lazy, so a model somewhat larger than memory would
    otherwise be allocated, then killed by the OOM killer while its weights are initialised.
    """
    available = available_memory()
    if available is not None and 4 * parameters > available:
        raise KdistillError(f"model {model!r} would have {parameters:.3g} parameters ({4 * parameters / 2**30:.3g} "
                            f"GiB), more than the {available / 2**30:.3g} GiB of memory available; make it smaller")
