"""Recipe + overrides -> a validated, read-only config; every mistake becomes one clear line."""

from __future__ import annotations

import copy
import difflib
import functools
import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from kdistill.config.describe import find_recipe
from kdistill.config.schema import RunConfig, TrainConfig
from kdistill.errors import KdistillError
from kdistill.losses import DEFAULT_LOSSES, build_objective, is_number
from kdistill.losses.terms import MAX_TEMPERATURE, MIN_TEMPERATURE
from kdistill.train.devices import DEVICE_PATTERN, PRECISIONS

MAX_SEED = 2**31 - 1  # a signed 32-bit int: every random generator takes it
MAX_COUNT = 100_000  # epochs, step_epochs, early_stop_patience: far beyond any real run, small enough to be safe
MAX_BATCH = 2**20
TEACHER_SIGNALS = ("auto", "live", "cached", "cached_views")
MAX_VIEWS = 1024  # a table of views x samples x classes logits: far beyond this it is no cache
MAX_TOP_K = 2 ** 20
MAX_NAME_BYTES = 255  # the longest file name most file systems take
# Maps whose keys the schema does not fix: a `{...}` override replaces them (or a map inside them) whole.
FREE_FORM_MAPS = ("teacher.kwargs", "student.kwargs", "distill.losses", "noisy_student.noise", "compress.losses")


def load_config(recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Merge the schema defaults, a YAML recipe and `key=value` overrides, then validate.

    Raises KdistillError (one line: the key, what is wrong, the closest valid key for a typo).
    """
    try:
        cfg = copy.deepcopy(_defaults())
        if recipe is not None:
            cfg = _merge(cfg, _read_recipe(find_recipe(recipe)))
        parsed = [_parse_override(item) for item in overrides]
        _forget_kwargs_of_replaced_models(cfg, [layer for _, layer in parsed])
        for key, layer in parsed:  # one at a time, so that an error names the override at fault
            _clear_replaced_map(cfg, key, layer)
            cfg = _merge(cfg, layer)
        try:
            if not cfg.distill.losses:
                cfg.distill.losses = DEFAULT_LOSSES
            OmegaConf.to_container(cfg, resolve=True)  # ${interpolations} that do not resolve
            validate(cfg)
        except OmegaConfBaseException as err:
            raise _explain(err, getattr(err, "full_key", None) or _unreadable_key(cfg) or "config") from None
    except KdistillError as err:
        raise KdistillError(_one_line(str(err))) from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


@functools.cache
def _defaults() -> DictConfig:
    """The schema as a config, built once: building it costs more than the rest of loading (copies are cheap)."""
    return OmegaConf.structured(RunConfig)


def _forget_kwargs_of_replaced_models(cfg: DictConfig, layers: list[dict]) -> None:
    """An override that names another model drops the recipe's kwargs, which were for the old one.

    Kwargs given by the same overrides (`student.name=mlp student.kwargs.hidden=[8]`) still apply:
    they are merged after this.
    """
    for role in ("teacher", "student"):
        names = [layer[role]["name"] for layer in layers
                 if isinstance(layer.get(role), Mapping) and "name" in layer[role]]  # role.name=x or role={name: x}
        if names and names[-1] != OmegaConf.select(cfg, f"{role}.name", throw_on_resolution_failure=False):
            cfg[role].kwargs = {}


def _clear_replaced_map(cfg: DictConfig, key: str, layer: dict) -> None:
    """`student.kwargs={hidden: [8]}` replaces the map, where OmegaConf would merge into it key by key.

    Only for free-form maps (a model's kwargs, the loss terms, one term): a schema section such as
    `train={epochs: 3}` has fixed keys, so merging into it is what one means.
    """
    if not any(key == top or key.startswith(f"{top}.") for top in FREE_FORM_MAPS):
        return
    given = OmegaConf.select(OmegaConf.create(layer), key, throw_on_resolution_failure=False)
    current = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
    if isinstance(given, DictConfig) and isinstance(current, DictConfig):
        OmegaConf.update(cfg, key, {}, merge=False)


GIVE_RECIPE = "give the path of a YAML file, or a built-in recipe's name (`kdistill list recipes`)"


def _read_recipe(path: Path) -> dict:
    if path.is_dir():
        raise KdistillError(f"recipe {path} is a directory: {GIVE_RECIPE}")
    try:
        data = path.read_bytes()
    except (FileNotFoundError, ValueError):  # ValueError: a NUL byte in the path
        raise KdistillError(f"recipe {path} not found: {GIVE_RECIPE}") from None
    except OSError as err:
        raise KdistillError(f"recipe {path} cannot be read ({err.strerror}): check the path and its permissions") \
            from None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is fine
    except UnicodeDecodeError as err:
        raise KdistillError(f"recipe {path} is not UTF-8 text (bad byte at offset {err.start}): save it as UTF-8") \
            from None
    try:
        loaded = OmegaConf.load(io.StringIO(text))
    except (yaml.YAMLError, OmegaConfBaseException, RecursionError) as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise KdistillError(f"recipe {path}{line} is not valid YAML ({_yaml_problem(err)}): fix its syntax") \
            from None
    except OSError:  # what OmegaConf raises for a document that is a number (or another scalar)
        loaded = None
    if not isinstance(loaded, DictConfig):
        raise KdistillError(f"recipe {path} must be a YAML mapping of keys to values")
    return OmegaConf.to_container(loaded)


def _parse_override(item: str) -> tuple[str, dict]:
    """`a.b=value` -> ("a.b", {"a": {"b": value}})."""
    key, equals, value = item.partition("=")
    key = key.strip()  # `train.lr = 0.1`, quoted, means train.lr
    if not equals or not key:
        raise KdistillError(f"override {item!r} is not key=value (example: distill.temperature=8)")
    if "[" in key or "]" in key:
        raise KdistillError(f"{key}: index syntax is not supported; give the whole list (example: "
                            "eval.latency_batches=[1,256])")
    if "" in key.split("."):
        raise KdistillError(f"override {item!r}: the key has an empty part; write dotted keys like train.lr=0.01")
    try:
        layer = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={value}"]))
    except (yaml.YAMLError, OmegaConfBaseException, RecursionError) as err:
        raise KdistillError(f"{key}: cannot parse the value {value!r} ({_yaml_problem(err)}); "
                            "quote text that is not meant as YAML") from None
    return key, layer


def _yaml_problem(err: Exception) -> str:
    return getattr(err, "problem", None) or _first_line(err)


def _merge(cfg: DictConfig, layer: Mapping) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, layer)
    except Exception:  # OmegaConf also raises TypeError, ValueError, ... for a value of the wrong shape
        raise _merge_error(cfg, layer, "") from None


def _merge_error(node: DictConfig, layer: Mapping, prefix: str) -> KdistillError:
    """Find the deepest key of `layer` that does not merge into `node`: OmegaConf's errors often lack it."""
    for key, value in layer.items():
        path = _join(prefix, str(key))
        try:
            OmegaConf.merge(node, {key: value})
            continue
        except Exception as err:  # as in _merge
            error = err
        child = node._get_node(key) if key in node else None  # the node itself: its kind, unresolved
        if isinstance(value, Mapping) and isinstance(child, DictConfig):
            return _merge_error(child, value, path)
        if value is None and child is not None:
            return KdistillError(f"{path}: cannot be null; leave it out to keep its default")
        if isinstance(child, DictConfig) and value is not None:
            return KdistillError(f"{path}: must be a mapping of keys to values (example: {path}.<key>=value), "
                                 f"got {value!r}")
        if isinstance(child, ListConfig) and value is not None:
            return KdistillError(f"{path}: must be a list (example: {path}=[1,2]), got {value!r}")
        if child is not None and isinstance(value, (Mapping, list)):
            return KdistillError(f"{path}: must be a single value, got {value!r}")
        return _explain(error, path, node)
    return KdistillError(f"{prefix or 'config'}: cannot merge {dict(layer)!r}")


def _explain(err: Exception, key: str, parent: DictConfig | None = None) -> KdistillError:
    """One line for an OmegaConf error at `key` (a full path); `parent` holds the key, for a typo's hint."""
    if isinstance(err, ConfigKeyError):
        parent_path, _, leaf = key.rpartition(".")
        valid = [str(k) for k in parent.keys()] if isinstance(parent, DictConfig) else []
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f"did you mean {_join(parent_path, close[0])}?" if close else (
            f"valid keys here: {', '.join(valid)}" if valid else "")
        shown = key if leaf else f"{key}'' (an empty key)" if parent_path else "'' (an empty key)"
        return KdistillError(f"{shown}: unknown key; {hint}".rstrip("; "))
    if isinstance(err, ValidationError):
        return KdistillError(f"{key}: wrong type: {_first_line(err)}")
    return KdistillError(f"{key}: {_first_line(err)}")


def _unreadable_key(node: DictConfig | ListConfig, prefix: str = "") -> str | None:
    """The first key whose value cannot be read (an ${interpolation} of the wrong type): errors may not name it."""
    for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
        path = f"{prefix}[{key}]" if isinstance(node, ListConfig) else _join(prefix, str(key))
        try:
            value = node[key]
        except OmegaConfBaseException:
            return path
        if isinstance(value, (DictConfig, ListConfig)) and (found := _unreadable_key(value, path)):
            return found
    return None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _one_line(text: str) -> str:
    """Escape what would break the line (newlines, NUL, ...): keys and values in a message come from the user."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _join(parent: str, leaf: str) -> str:
    return f"{parent}.{leaf}" if parent else leaf


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise KdistillError(f"{key}: {message}")


def _in_range(value: Any, key: str, low: float, high: float = math.inf, *, open_low: bool = False,
              open_high: bool = False, null_ok: bool = False) -> None:
    """`value` must be a finite number between `low` and `high` (excluded when open); a bool is not a number."""
    if value is None and null_ok:
        return
    ok = is_number(value) and (value > low if open_low else value >= low)
    ok = ok and (value < high if open_high else value <= high)
    if not ok:
        limits = [f"{'>' if open_low else '>='} {low}"]
        if not isinstance(value, int):
            limits.append("finite")
        if high != math.inf:
            limits.append(f"{'<' if open_high else '<='} {high}")
        raise KdistillError(f"{key}: must be {' and '.join(limits)}{' or null' if null_ok else ''}, got {value!r}")


def check_training(train: DictConfig, prefix: str) -> None:
    def key(name: str) -> str:
        return _join(prefix, name)

    _in_range(train.epochs, key("epochs"), 1, MAX_COUNT)
    _in_range(train.batch_size, key("batch_size"), 1, MAX_BATCH)
    _in_range(train.lr, key("lr"), 0, 100, open_low=True)
    _in_range(train.weight_decay, key("weight_decay"), 0, 1)
    _in_range(train.momentum, key("momentum"), 0, 1, open_high=True)
    _in_range(train.warmup_epochs, key("warmup_epochs"), 0, train.epochs)
    _in_range(train.step_epochs, key("step_epochs"), 1, MAX_COUNT)
    _in_range(train.step_gamma, key("step_gamma"), 0, 1, open_low=True)
    _in_range(train.grad_clip, key("grad_clip"), 0, open_low=True, null_ok=True)
    _in_range(train.label_smoothing, key("label_smoothing"), 0, 1, open_high=True)
    _in_range(train.ema_decay, key("ema_decay"), 0, 1, open_low=True, open_high=True, null_ok=True)
    _in_range(train.augment.crop_padding, key("augment.crop_padding"), 0, 64)
    _in_range(train.augment.cutout, key("augment.cutout"), 0, 4096)
    _in_range(train.augment.color_jitter, key("augment.color_jitter"), 0, 1)
    _in_range(train.augment.mixup, key("augment.mixup"), 0, 100)
    _in_range(train.augment.cutmix, key("augment.cutmix"), 0, 100)
    scale = train.augment.resized_crop
    if scale is not None:
        _check(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, key("augment.resized_crop"),
               f"must be [min, max] area fractions with 0 < min <= max <= 1, got {list(scale)}; e.g. [0.35, 1]")
    _in_range(train.early_stop_patience, key("early_stop_patience"), 1, MAX_COUNT, null_ok=True)
    _in_range(train.log_every_steps, key("log_every_steps"), 1, 10**9)
    _in_range(train.checkpoint_every_steps, key("checkpoint_every_steps"), 1, 10**9, null_ok=True)
    milestones = list(train.milestones)
    for i, epoch in enumerate(milestones):
        _in_range(epoch, key(f"milestones[{i}]"), 1, train.epochs)
    _check(milestones == sorted(set(milestones)), key("milestones"), f"must be increasing epochs, got {milestones}")
    _check(train.schedule != "multistep" or bool(milestones), key("milestones"),
           "the multistep schedule needs epochs to decay at, e.g. [150, 180, 210]")
    for name, allowed in (("optimizer", ("sgd", "adam", "adamw")),
                          ("schedule", ("none", "cosine", "step", "multistep")),
                          ("precision", PRECISIONS)):
        value = train[name]
        _check(value in allowed, key(name), f"{value!r} is not one of {', '.join(allowed)}")


def _check_folder_name(name: str) -> None:
    # The run folder is <out_dir>/<name>: anything but one plain path component could land elsewhere.
    plain = (name not in ("", ".", "..") and not name.startswith("-") and "/" not in name and "\\" not in name
             and all(c.isprintable() for c in name))
    _check(plain, "name", f"{name!r} must be a plain folder name (not empty, . or .., no / or \\, no control or "
                          "invisible characters, not starting with -)")
    size = len(name.encode("utf-8"))
    _check(size <= MAX_NAME_BYTES, "name", f"is {size} bytes long in UTF-8; at most {MAX_NAME_BYTES} fit a folder name")


def _check_path(path: str | None, key: str) -> None:
    if path is None:
        return
    _check("\0" not in path, key, "contains a NUL byte; give a plain path")
    try:
        os.fsencode(path)
    except UnicodeError:
        raise KdistillError(f"{key}: {path!r} has characters the file system cannot take; give a plain path") \
            from None


def validate(cfg: DictConfig) -> None:
    """What OmegaConf's types cannot express (ranges, names, paths, loss terms); raises KdistillError naming the key."""
    _check_folder_name(cfg.name)
    for key in ("out_dir", "data.root", "distill.cache_dir", "teacher.checkpoint"):
        _check_path(OmegaConf.select(cfg, key), key)
    _in_range(cfg.seed, "seed", 0, MAX_SEED)
    _in_range(cfg.threads, "threads", 1, 1024, null_ok=True)
    _check(isinstance(cfg.device, str) and DEVICE_PATTERN.fullmatch(cfg.device) is not None, "device",
           f"{cfg.device!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    _check(cfg.data.on_device == "auto" or isinstance(cfg.data.on_device, bool), "data.on_device",
           f"{cfg.data.on_device!r} must be auto, true or false")
    check_training(cfg.train, "train")
    check_training(cfg.teacher.train, "teacher.train")
    for key in ("val_size", "test_size"):
        size = cfg.data[key]
        _check((is_number(size) and isinstance(size, int) and 1 <= size <= 10**9)
               or (isinstance(size, float) and 0 < size < 1),
               f"data.{key}", f"must be a count (1 to 10^9) or a fraction between 0 and 1, got {size!r}")
    _in_range(cfg.data.max_val_size, "data.max_val_size", 1, 10**9, null_ok=True)
    _check(cfg.data.channels in (None, 1, 3), "data.channels", f"must be 1, 3 or null, got {cfg.data.channels!r}")
    _in_range(cfg.data.image_size, "data.image_size", 1, 4096, null_ok=True)
    _in_range(cfg.data.split_seed, "data.split_seed", 0, MAX_SEED)
    _in_range(cfg.data.labelled_fraction, "data.labelled_fraction", 0, 1, open_low=True)
    _in_range(cfg.data.unlabelled.max_size, "data.unlabelled.max_size", 1, 10**9, null_ok=True)
    _check_path(cfg.data.unlabelled.root, "data.unlabelled.root")
    _in_range(cfg.distill.pseudo_labels.min_confidence, "distill.pseudo_labels.min_confidence", 0, 1)
    if cfg.data.labelled_fraction < 1 or cfg.data.unlabelled.name:
        _check_unlabelled_training(cfg)
    _in_range(cfg.distill.temperature, "distill.temperature", MIN_TEMPERATURE, MAX_TEMPERATURE)
    _check(cfg.distill.teacher_signal in TEACHER_SIGNALS, "distill.teacher_signal",
           f"{cfg.distill.teacher_signal!r} is not one of {', '.join(TEACHER_SIGNALS)}")
    _check(is_number(cfg.distill.views) and 1 <= cfg.distill.views <= MAX_VIEWS, "distill.views",
           f"the teacher's logits are cached for this many augmented views of each sample: give 1 to {MAX_VIEWS}, "
           f"got {cfg.distill.views!r}")
    _check(is_number(cfg.distill.top_k) and 0 <= cfg.distill.top_k <= MAX_TOP_K, "distill.top_k",
           f"the number of logits kept per cached row: 0 (every one) to {MAX_TOP_K}, got {cfg.distill.top_k!r}")
    _in_range(cfg.eval.batch_size, "eval.batch_size", 1, MAX_BATCH)
    _in_range(cfg.eval.latency_repeats, "eval.latency_repeats", 1, 10_000)
    batches = cfg.eval.latency_batches
    _check(1 <= len(batches) <= 16, "eval.latency_batches", f"must list 1 to 16 batch sizes, got {len(batches)}")
    for i, size in enumerate(batches):
        _in_range(size, f"eval.latency_batches[{i}]", 1, 65_536)
    # Loss terms are checked against their registered signatures.
    build_objective(cfg.distill.losses, cfg.distill.temperature, cfg.distill.normalize_weights,
                    cfg.train.label_smoothing, cfg.train.epochs)
    from kdistill.schemes import check_scheme  # here: the schemes import the pipeline, which imports this module

    check_scheme(cfg)
    from kdistill.deploy.compress import check_compress

    check_compress(cfg)


def _check_unlabelled_training(cfg: DictConfig) -> None:
    """An unlabelled pool is learnt from through the teacher: only `ce` reads labels, and only of labelled rows."""
    objective = build_objective(cfg.distill.losses, cfg.distill.temperature)
    others = [label for label in objective.labelled_terms if type(objective.terms[label]).__name__ != "CrossEntropy"]
    if others:
        raise KdistillError(f"distill.losses.{others[0]} reads each sample's true class, which the unlabelled pool "
                            "does not have: with data.labelled_fraction < 1 or data.unlabelled, only ce reads "
                            "labels (of the labelled samples)")
    if not objective.needs_teacher:
        raise KdistillError("data.labelled_fraction / data.unlabelled: no loss term reads the teacher, so the "
                            "unlabelled pool would teach nothing; add kd (or js, dist, ...)")
    augment = cfg.train.augment
    if augment.mixup or augment.cutmix:
        raise KdistillError("train.augment.mixup / cutmix blend labels, which the unlabelled pool does not have: "
                            "turn them off with an unlabelled pool")


def train_config(**options) -> DictConfig:
    """A validated TrainConfig from keyword arguments (for the Python API); errors name the argument."""
    try:
        cfg = _merge(OmegaConf.structured(TrainConfig), options)
        try:
            check_training(cfg, "")
        except OmegaConfBaseException as err:
            raise _explain(err, getattr(err, "full_key", None) or _unreadable_key(cfg) or "config") from None
    except KdistillError as err:
        raise KdistillError(_one_line(str(err))) from None
    return cfg
