"""The model registry and `create_model`, the one factory every caller goes through.

As in timm, a model is named by a string: either a registered builder (`"resnet"`) or a user
class given as `"module.path:ClassName"`. The registry is a plain dict filled by the
`register_model` decorator.

A recipe is untrusted input, so a `module:Name` must be a subclass of `torch.nn.Module`, checked
before anything is called: otherwise `os:system` with `kwargs: {command: ...}` would run a shell
command. Importing the module still runs its top-level code; that is what naming a module means.
"""

import difflib
import functools
import importlib
import inspect
import json
from collections.abc import Callable
from typing import Any, NamedTuple

from torch import nn

from kdistill.errors import KdistillError

# fn(input_shape, num_classes, **kwargs) -> nn.Module; input_shape is (channels, height, width).
Builder = Callable[..., nn.Module]

MAX_CLASSES = 2 ** 20  # far above any real label set; a bigger num_classes is a typo


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

    `name` is a registered model (see `MODELS`) or `"module.path:ClassName"`, a subclass of
    `torch.nn.Module`. A user model receives `kwargs`, plus `input_shape`, `num_classes` and
    `in_channels` (= C) for those of them its signature names, unless `kwargs` sets them.
    Whatever the constructor raises becomes a one-line KdistillError naming the model.
    """
    input_shape = _check_input_shape(name, input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
        raise KdistillError(f"model {name!r}: num_classes must be a positive integer at most {MAX_CLASSES}, "
                            f"got {num_classes!r}")
    if ":" in name:
        build = _user_model(name, input_shape, num_classes, kwargs)
    elif name in MODELS:
        builder = MODELS[name].builder
        _check_arguments(name, builder, kwargs, supplied=("input_shape", "num_classes"))
        build = functools.partial(builder, input_shape, num_classes, **kwargs)
    else:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise KdistillError(f"unknown model {name!r}; {hint}registered models: {', '.join(sorted(MODELS))} "
                            "(or give your own as 'module.path:ClassName')")
    try:
        model = build()
    except KdistillError:
        raise
    except Exception as error:  # a user's constructor can raise anything; an absurd size raises MemoryError
        fix = ("it is too large for this machine's memory, make it smaller" if _out_of_memory(error)
               else "fix the model's arguments or its constructor")
        given = f" with arguments {kwargs}" if kwargs else ""
        raise KdistillError(f"model {name!r} cannot be built{given}: {describe_error(error)}; {fix}") from error
    return _checked_module(name, model)


def builder_arguments(builder: Callable) -> str:
    """The arguments a recipe may give a registered model, as `name=default, ...` ("" when none)."""
    params = _keyword_parameters(builder) or {}
    shown = [p for name, p in params.items()
             if name not in ("input_shape", "num_classes") and p.kind is not p.VAR_KEYWORD]
    # Defaults as a recipe writes them (JSON is YAML): hidden=[1200, 1200], not (1200, 1200).
    return ", ".join(p.name if p.default is p.empty else f"{p.name}={json.dumps(p.default, default=repr)}"
                     for p in shown)


def describe_error(error: BaseException) -> str:
    """`error` as one short line: its type and the first line of its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _out_of_memory(error: Exception) -> bool:
    # torch's CPU allocator raises RuntimeError "... can't allocate memory ...", not MemoryError.
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "allocate" in str(error))


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


def _user_model(spec: str, input_shape: tuple[int, int, int], num_classes: int,
                kwargs: dict[str, Any]) -> Callable[[], nn.Module]:
    """The call that builds user model `spec`, after checking that it names an nn.Module class."""
    module_path, _, attr_path = spec.partition(":")
    if not module_path or not attr_path:
        raise KdistillError(f"model {spec!r}: expected 'module.path:ClassName', e.g. 'mypkg.nets:SmallNet'")
    try:
        target: Any = importlib.import_module(module_path)
    except Exception as error:
        missing = error.name if isinstance(error, ModuleNotFoundError) else None
        if missing and f"{module_path}.".startswith(f"{missing}."):  # the module itself, or its package
            raise KdistillError(f"model {spec!r}: cannot import {module_path} (no module named {missing!r}); is it "
                                "installed, or its folder on PYTHONPATH?") from error
        # Its top-level code failed, an import of its own included: PYTHONPATH is not the problem.
        raise KdistillError(f"model {spec!r}: importing {module_path} failed ({describe_error(error)}); "
                            "fix the module") from error
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError:
            raise KdistillError(f"model {spec!r}: {module_path} has no {attr_path}; {_class_hint(target, attr)}") \
                from None
    # Nothing is called until this holds: a recipe must not be able to run any function it names.
    if not (isinstance(target, type) and issubclass(target, nn.Module)):
        kind = "a class" if isinstance(target, type) else "a function" if inspect.isroutine(target) else "an object"
        raise KdistillError(f"model {spec!r}: {attr_path} is {kind}, not a subclass of torch.nn.Module; name a model "
                            "class (from Python, you can also pass a built nn.Module)")

    supplied = {"input_shape": input_shape, "num_classes": num_classes, "in_channels": input_shape[0]}
    params = _keyword_parameters(target)
    if params is not None:  # None: no readable signature (some C extensions), so pass kwargs only
        supplied = {key: value for key, value in supplied.items() if key in params and key not in kwargs}
        _check_arguments(spec, target, kwargs, supplied=tuple(supplied))
        kwargs = {**supplied, **kwargs}
    return functools.partial(target, **kwargs)


def _class_hint(namespace: Any, name: str) -> str:
    """The nn.Module class of `namespace` (a module, or a class) closest to the misspelt `name`, or all of them."""
    classes = [key for key, value in getattr(namespace, "__dict__", {}).items()
               if isinstance(value, type) and issubclass(value, nn.Module) and not key.startswith("_")]
    close = difflib.get_close_matches(name, classes, n=1)
    return f"did you mean {close[0]!r}?" if close else f"its nn.Module classes: {', '.join(sorted(classes)) or 'none'}"


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
