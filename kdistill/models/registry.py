"""The model registry and `create_model`, the one factory every caller goes through.

As in timm, a model is named by a string: either a registered builder (`"resnet"`) or a user
class or function given as `"module.path:ClassName"`. The registry is a plain dict filled by
the `register_model` decorator.
"""

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

from torch import nn

from kdistill.errors import KdistillError

# fn(input_shape, num_classes, **kwargs) -> nn.Module; input_shape is (channels, height, width).
Builder = Callable[..., nn.Module]


class ModelInfo(NamedTuple):
    builder: Builder
    description: str


MODELS: dict[str, ModelInfo] = {}


def register_model(name: str, description: str) -> Callable[[Builder], Builder]:
    """Decorator that adds a builder `fn(input_shape, num_classes, **kwargs)` to `MODELS`."""
    if not name or ":" in name:
        raise KdistillError(f"cannot register model {name!r}: names must be non-empty and free of ':' "
                            "(':' marks a 'module.path:ClassName' user model)")

    def add(builder: Builder) -> Builder:
        if name in MODELS:
            raise KdistillError(f"model {name!r} is already registered; pick another name")
        MODELS[name] = ModelInfo(builder, description)
        return builder
    return add


def create_model(name: str, input_shape: tuple[int, int, int], num_classes: int, **kwargs: Any) -> nn.Module:
    """Build model `name` for inputs of shape (C, H, W) and `num_classes` outputs.

    `name` is a registered model (see `MODELS`) or `"module.path:ClassName"` (a class or a
    function). A user model receives `kwargs`, plus `input_shape`, `num_classes` and
    `in_channels` (= C) for those of them its signature names, unless `kwargs` sets them.
    """
    input_shape = _check_input_shape(name, input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise KdistillError(f"model {name!r}: num_classes must be a positive integer, got {num_classes!r}")
    if ":" in name:
        return _create_user_model(name, input_shape, num_classes, kwargs)
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise KdistillError(f"unknown model {name!r}; {hint}registered models: {', '.join(sorted(MODELS))} "
                            "(or give your own as 'module.path:ClassName')")
    builder = MODELS[name].builder
    _check_arguments(name, builder, kwargs, supplied=("input_shape", "num_classes"))
    return _checked_module(name, builder(input_shape, num_classes, **kwargs))


def _check_input_shape(name: str, input_shape: Any) -> tuple[int, int, int]:
    # Accept any sequence (a list from YAML, an OmegaConf ListConfig) and hand builders a tuple.
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise KdistillError(f"model {name!r}: input_shape must be three positive integers (channels, height, "
                            f"width), got {input_shape!r}")
    return shape


def _create_user_model(spec: str, input_shape: tuple[int, int, int], num_classes: int,
                       kwargs: dict[str, Any]) -> nn.Module:
    module_path, _, attr_path = spec.partition(":")
    if not module_path or not attr_path:
        raise KdistillError(f"model {spec!r}: expected 'module.path:ClassName', e.g. 'mypkg.nets:SmallNet'")
    try:
        target: Any = importlib.import_module(module_path)
        for attr in attr_path.split("."):
            target = getattr(target, attr)
    except (ImportError, AttributeError) as error:
        raise KdistillError(f"model {spec!r}: cannot import {attr_path} from {module_path} ({error}); "
                            "is the module on PYTHONPATH?") from error
    if not callable(target):
        raise KdistillError(f"model {spec!r}: {attr_path} is not a class or function")

    supplied = {"input_shape": input_shape, "num_classes": num_classes, "in_channels": input_shape[0]}
    params = _keyword_parameters(target)
    if params is not None:  # None: no readable signature (some C extensions), so pass kwargs only
        supplied = {key: value for key, value in supplied.items() if key in params and key not in kwargs}
        _check_arguments(spec, target, kwargs, supplied=tuple(supplied))
        kwargs = {**supplied, **kwargs}
    return _checked_module(spec, target(**kwargs))


def _keyword_parameters(fn: Callable) -> dict[str, inspect.Parameter] | None:
    """The parameters of `fn` that can be passed by keyword (plus any **kwargs), None if unreadable."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    return {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.VAR_KEYWORD)}


def _check_arguments(name: str, fn: Callable, kwargs: dict[str, Any], supplied: tuple[str, ...]) -> None:
    """Fail before calling `fn` if `kwargs` has names it does not take or lacks ones it needs.

    `supplied` are the arguments the factory passes itself; they are not the user's to give.
    """
    params = _keyword_parameters(fn)
    if params is None:
        return
    named = [p for p in params.values() if p.kind is not p.VAR_KEYWORD and p.name not in supplied]
    takes = [p.name for p in named]
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):  # without **kwargs the names are final
        for arg in kwargs:
            if arg not in takes:
                close = difflib.get_close_matches(arg, takes, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise KdistillError(f"model {name!r} does not take argument {arg!r} "
                                    f"(it takes: {', '.join(takes) or 'no arguments'}{hint})")
    for p in named:
        if p.default is p.empty and p.name not in kwargs:
            raise KdistillError(f"model {name!r} needs argument {p.name!r}; set it in the model's kwargs")


def _checked_module(name: str, model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise KdistillError(f"model {name!r} returned {type(model).__name__}, not a torch.nn.Module; "
                            "it must build and return the network")
    return model
