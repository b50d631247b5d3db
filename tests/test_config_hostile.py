"""Hostile input to the config loader: every outcome is a valid read-only config or ONE clear line.

A property-based test feeds `load_config` random recipes and overrides (KDISTILL_FUZZ_EXAMPLES sets
how many); the unit tests below pin one defect each of the hostile-user review.
"""

import dataclasses
import io
import math
import os
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from kdistill.config import RunConfig, load_config, train_config
from kdistill.errors import KdistillError
from kdistill.losses import build_objective

DIGITS = "recipes/digits_quick.yaml"
ROOTS = [f.name for f in dataclasses.fields(RunConfig)]


def one_line(err: KdistillError) -> str:
    message = str(err)
    assert message and len(message.splitlines()) == 1 and "\n" not in message and "\r" not in message, message
    return message


def fails(recipe, overrides, expected: str) -> str:
    with pytest.raises(KdistillError) as err:
        load_config(recipe, overrides)
    message = one_line(err.value)
    assert expected in message, message
    return message


# ---------------------------------------------------------------- the property-based test

def _leaves(cls, prefix=""):
    """(dotted key, type) of every field of the schema."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], f"{path}.")
        else:
            yield path, hints[f.name]


LEAVES = dict(_leaves(RunConfig))
GOOD_LOSS_KEYS = [f"distill.losses.{key}" for key in ("ce.weight", "ce.label_smoothing", "kd.weight", "kd.temperature",
                                                      "soft_ce.weight", "soft_ce.temperature", "logit_mse.weight",
                                                      "tang.weight", "tang.alpha")]
ODD_LOSS_KEYS = ["distill.losses", "distill.losses.kd", "distill.losses.ce", "distill.losses.kd.type",
                 "distill.losses.hint.type", "distill.losses.kd.foo", "distill.losses.ce.temperature"]
CHOICES = {"optimizer": ["sgd", "adam", "adamw"], "schedule": ["none", "cosine", "step"],
           "precision": ["fp32", "bf16", "fp16"], "device": ["auto", "cpu", "cuda", "cuda:1", "mps"],
           "on_device": ["auto", True, False]}


def _good(key: str):
    """Values a user would plausibly give for `key` (all in range)."""
    if key in GOOD_LOSS_KEYS:
        return st.floats(0.1, 5) if key.endswith(".weight") else st.floats(0.5, 20) if key.endswith(
            ".temperature") else st.floats(0, 0.5)
    tp, leaf = LEAVES[key], key.rpartition(".")[2]
    optional = typing.get_origin(tp) is typing.Union  # Optional[X]
    tp = typing.get_args(tp)[0] if optional else tp
    good = (
        st.sampled_from(CHOICES[leaf]) if leaf in CHOICES
        else st.booleans() if tp is bool
        else st.integers(1, 64) if tp is int
        else st.floats(0.01, 0.9) if tp is float
        else st.sampled_from(["mlp", "digits", "run_1", "été"]) if tp is str
        else st.lists(st.integers(1, 512), min_size=1, max_size=4) if typing.get_origin(tp) is list
        else st.dictionaries(st.sampled_from(["hidden", "width"]), st.lists(st.integers(1, 64), max_size=3),
                             max_size=2)
    )
    return st.one_of(st.none(), good) if optional else good


EDGES = st.one_of(
    st.sampled_from([0, -1, 2**31, 2**63, 10**400, -10**400, 1e300, 1e-320, -0.0, math.nan, math.inf, -math.inf]),
    st.sampled_from([True, None, "", ".", "..", "-x", "a/b", "a\\b", "a\0b", "${seed}", "${nope}", "é" * 200]))
SCALARS = st.one_of(EDGES, st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12))
HOSTILE = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8)


def _misspelt(key: str, data) -> str:
    i = data.draw(st.integers(0, len(key) - 1))
    return key[:i] + key[i + 1:] if data.draw(st.booleans()) else key[:i] + "x" + key[i:]


def _key(data, hostile: bool) -> str:
    if not hostile:
        return data.draw(st.sampled_from(sorted(LEAVES) + GOOD_LOSS_KEYS))
    kind = data.draw(st.sampled_from(["real"] * 5 + ["loss"] * 2 + ["misspelt", "unknown"]))
    if kind == "real":
        return data.draw(st.sampled_from(sorted(LEAVES)))
    if kind == "loss":
        return data.draw(st.sampled_from(GOOD_LOSS_KEYS * 2 + ODD_LOSS_KEYS))
    if kind == "misspelt":
        return _misspelt(data.draw(st.sampled_from(sorted(LEAVES) + GOOD_LOSS_KEYS)), data)
    return data.draw(st.sampled_from(ROOTS + ["zzz"])) + "." + data.draw(st.text("abcxyz_é", min_size=1, max_size=5))


def _value(key: str, data, hostile: bool):
    # Mostly good values, so that the odd bad one gets past the checks that come before its own.
    kind = data.draw(st.sampled_from(["good"] * 3 + ["edge"] * 3 + ["loss", "hostile"])) if hostile else "good"
    if kind == "good" and (key in LEAVES or key in GOOD_LOSS_KEYS):
        return data.draw(_good(key))
    if kind == "edge":
        return data.draw(EDGES)
    if kind == "loss" and key.startswith("distill.losses."):
        return data.draw(st.one_of(st.floats(-1, 5), st.sampled_from(["kd", "ce", "tang", "nope"]), st.none()))
    return data.draw(HOSTILE)


def _recipe(data, hostile: bool) -> dict:
    recipe: dict = {}
    for _ in range(data.draw(st.integers(0, 8))):
        key = _key(data, hostile)
        node = recipe
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = _value(key, data, hostile)
    return recipe


def _yaml_text(value) -> str:
    """How a user would type `value` after `key=`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def _override(data, hostile: bool) -> str:
    kind = "key" if not hostile else data.draw(
        st.sampled_from(["key"] * 6 + ["index", "no_equals", "empty_key", "text", "loss_param"]))
    if kind == "key":
        key = _key(data, hostile)
        return f"{key}={_yaml_text(_value(key, data, hostile))}"
    if kind == "index":
        return f"eval.latency_batches[{data.draw(st.integers(-1, 3))}]={data.draw(st.integers(-1, 9))}"
    if kind == "no_equals":
        return data.draw(st.sampled_from(sorted(LEAVES)))
    if kind == "empty_key":
        return f"={data.draw(st.text(max_size=5))}"
    if kind == "loss_param":
        return f"distill.losses.kd.{data.draw(st.sampled_from(['foo', 'temprature', 'type', 'weight']))}=1"
    return data.draw(st.text(max_size=20))


def _recipe_bytes(data, hostile: bool) -> bytes:
    kind = "mapping" if not hostile else data.draw(
        st.sampled_from(["mapping"] * 6 + ["hostile", "random", "latin1", "nul", "utf16"]))
    if kind == "random":
        return data.draw(st.binary(max_size=64))
    if kind == "hostile":
        return yaml.safe_dump(data.draw(HOSTILE), allow_unicode=True).encode()
    text = yaml.safe_dump(_recipe(data, hostile), allow_unicode=True)
    if kind == "latin1":  # a stray byte that is not UTF-8
        return text.encode() + "name: café\n".encode("latin-1")
    if kind == "nul":
        i = data.draw(st.integers(0, len(text)))
        return (text[:i] + "\0" + text[i:]).encode()
    return text.encode("utf-16" if kind == "utf16" else "utf-8")


def _escaped(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile") / "recipe.yaml"


# Derandomized in the normal suite (the same examples every run, so CI cannot flake); fresh ones with the variable.
@settings(max_examples=int(os.environ.get("KDISTILL_FUZZ_EXAMPLES", 200)), deadline=None,
          derandomize=not os.environ.get("KDISTILL_FUZZ_EXAMPLES"),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_any_input_gives_a_config_or_one_clear_line(recipe_file, data):
    hostile = data.draw(st.integers(0, 3)) > 0  # a quarter of the examples are plausible (and mostly valid) input
    recipe_file.write_bytes(_recipe_bytes(data, hostile))
    recipe = data.draw(st.sampled_from([recipe_file] * 8 + [None, recipe_file.parent, recipe_file.with_name("no")]))
    overrides = [_override(data, hostile) for _ in range(data.draw(st.integers(0, 4)))]
    try:
        cfg = load_config(recipe, overrides)
    except KdistillError as err:
        message = one_line(err)
        event("refused with one line")  # --hypothesis-show-statistics shows the share of each outcome
        head = message.split(": ", 1)[0]
        # Starts with a clear word or a key: one of the schema's or one the user wrote (escaped if need be).
        roots = set(ROOTS) | {_escaped(item.partition("=")[0].strip().split(".")[0]) for item in overrides}
        if recipe == recipe_file:
            try:  # the keys as the loader reads them (`1e3:` is the number 1000.0)
                roots |= {_escaped(str(k)) for k in OmegaConf.load(io.StringIO(recipe_file.read_text("utf-8")))}
            except Exception:  # not UTF-8 YAML, not a mapping: then the message must start with "recipe"
                pass
        roots.discard("")
        assert message.startswith(("recipe ", "override ", "'' (an empty key)")) or any(
            head == root or head.startswith((f"{root}.", f"{root}[")) for root in roots), message
        return
    event("valid config")
    assert OmegaConf.is_readonly(cfg)
    assert 1 <= cfg.train.epochs <= 100_000 and 0 < cfg.distill.temperature <= 1000
    build_objective(cfg.distill.losses, cfg.distill.temperature)  # the pipeline's objective builds
    # A run saves its config; that file must load back to the same config.
    recipe_file.write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
    assert load_config(recipe_file) == cfg


# ---------------------------------------------------------------- 1. merge errors of any kind

@pytest.mark.parametrize("override, expected", [
    ("teacher.kwargs=[8,8]", "teacher.kwargs: must be a mapping"),
    ("eval.latency_batches={a: 1}", "eval.latency_batches: must be a list"),
    ("train.epochs=[1,2]", "train.epochs: must be a single value"),
    ("train=3", "train: must be a mapping"),
    ("train.augment=[1]", "train.augment: must be a mapping"),
    ("data=null", "data: cannot be null"),
])
def test_a_value_of_the_wrong_shape_names_its_key(override, expected):
    fails(DIGITS, [override], expected)


def test_a_recipe_value_of_the_wrong_shape_names_its_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("eval:\n  latency_batches: {a: 1}\n")
    fails(recipe, [], "eval.latency_batches: must be a list")
    recipe.write_text("student:\n  kwargs: [16]\n")
    fails(recipe, [], "student.kwargs: must be a mapping")


def test_index_syntax_is_refused_with_a_hint():
    fails(DIGITS, ["eval.latency_batches[0]=1"], "give the whole list")


# ---------------------------------------------------------------- 2. one override at a time

def test_an_unparsable_override_names_only_itself():
    message = fails(DIGITS, ["distill.temperature=8", "train.lr=[1", "seed=3"], "train.lr: cannot parse the value")
    assert "distill.temperature" not in message and "seed" not in message


def test_overrides_with_spaces_around_the_key():
    assert load_config(DIGITS, [" train.epochs = 3"]).train.epochs == 3


# ---------------------------------------------------------------- 3. recipes that are not UTF-8 YAML files

def test_recipe_that_is_not_utf8(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("name: café\n".encode("latin-1"))
    fails(recipe, [], "is not UTF-8 text")


def test_recipe_with_a_nul_byte(tmp_path):
    recipe = tmp_path / "nul.yaml"
    recipe.write_bytes(b"name: a\0b\n")
    fails(recipe, [], "#x0000")


def test_recipe_that_is_a_directory(tmp_path):
    fails(tmp_path, [], "is a directory")


def test_recipe_that_cannot_be_read(tmp_path):
    (tmp_path / "file").write_text("")
    fails(tmp_path / "file" / "r.yaml", [], "cannot be read")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_recipe_without_read_permission(tmp_path):
    recipe = tmp_path / "secret.yaml"
    recipe.write_text("seed: 1\n")
    recipe.chmod(0)
    fails(recipe, [], "cannot be read")


def test_recipe_that_is_a_number(tmp_path):
    recipe = tmp_path / "n.yaml"
    recipe.write_text("3\n")
    fails(recipe, [], "must be a YAML mapping")


# ---------------------------------------------------------------- 4. every number within bounds

@pytest.mark.parametrize("override, expected", [
    ("seed=-1", "seed: must be >= 0 and <= 2147483647, got -1"),
    ("seed=2147483648", "seed: must be >= 0 and <= 2147483647"),
    ("data.split_seed=-1", "data.split_seed: must be >= 0"),
    ("threads=0", "threads: must be >= 1 and <= 1024 or null"),
    ("threads=5000", "threads: must be >= 1 and <= 1024 or null"),
    ("train.epochs=100001", "train.epochs: must be >= 1 and <= 100000"),
    ("teacher.train.batch_size=1048577", "teacher.train.batch_size: must be >= 1 and <= 1048576"),
    ("eval.batch_size=1048577", "eval.batch_size: must be >= 1 and <= 1048576"),
    ("train.lr=101", "train.lr: must be > 0 and finite and <= 100"),
    ("train.warmup_epochs=.nan", "train.warmup_epochs: must be >= 0 and finite"),
    ("train.weight_decay=2", "train.weight_decay: must be >= 0 and finite and <= 1"),
    ("train.weight_decay=.inf", "train.weight_decay: must be >= 0 and finite"),
    ("train.warmup_epochs=21", "train.warmup_epochs: must be >= 0 and finite and <= 20"),
    ("train.step_epochs=100001", "train.step_epochs: must be >= 1 and <= 100000"),
    ("train.grad_clip=-1", "train.grad_clip: must be > 0 and finite or null"),
    ("train.grad_clip=.inf", "train.grad_clip: must be > 0 and finite or null"),
    ("train.momentum=.nan", "train.momentum: must be >= 0 and finite and < 1"),
    ("train.early_stop_patience=100001", "train.early_stop_patience: must be >= 1 and <= 100000 or null"),
    ("train.augment.crop_padding=65", "train.augment.crop_padding: must be >= 0 and <= 64"),
    ("data.val_size=1000000001", "data.val_size: must be a count (1 to 10^9) or a fraction"),
    ("distill.temperature=1e300", "distill.temperature: must be >= 0.01 and finite and <= 1000"),
    ("distill.temperature=1e-300", "distill.temperature: must be >= 0.01"),  # z / T overflows: "diverged" after hours
    ("distill.losses.kd.temperature=1e300", "distill.losses.kd: temperature must be >= 0.01 and <= 1000"),
    ("distill.losses.kd.weight=1e300", "distill.losses.kd.weight: must be a number >= 0 and <= 1000000"),
    ("eval.latency_repeats=10001", "eval.latency_repeats: must be >= 1 and <= 10000"),
    ("eval.latency_batches=[]", "eval.latency_batches: must list 1 to 16 batch sizes"),
    (f"eval.latency_batches=[{','.join(['1'] * 17)}]", "eval.latency_batches: must list 1 to 16 batch sizes"),
    ("eval.latency_batches=[1,65537]", "eval.latency_batches[1]: must be >= 1 and <= 65536, got 65537"),
    ("seed=" + "9" * 400, "seed: must be >= 0 and <= 2147483647"),
    ("distill.losses.kd.weight=" + "9" * 400, "distill.losses.kd.weight: must be a number >= 0"),
    ("distill.losses.kd.temperature=" + "9" * 400, "distill.losses.kd: temperature must be >= 0.01"),
])
def test_numbers_out_of_bounds(override, expected):
    fails(DIGITS, [override], expected)


@pytest.mark.parametrize("override", ["train.epochs=true", "seed=false", "train.lr=true", "threads=true"])
def test_booleans_are_not_numbers(override):
    fails(DIGITS, [override], "wrong type")


def test_bounds_admit_their_limits():
    cfg = load_config(DIGITS, ["seed=2147483647", "threads=1024", "train.epochs=100000", "train.lr=100",
                               "train.warmup_epochs=100000", "distill.temperature=1000", "train.grad_clip=null",
                               "distill.losses.kd.weight=1000000", "eval.latency_batches=[65536]"])
    assert cfg.seed == 2**31 - 1 and cfg.distill.temperature == 1000


# ---------------------------------------------------------------- 5. names and paths

@pytest.mark.parametrize("name", ["a\\b", "-rf", "a\tb", "a\u2028b", "é" * 128])
def test_name_must_be_a_plain_folder_name(tmp_path, name):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": name}, allow_unicode=True), encoding="utf-8")
    fails(recipe, [], "name: ")


@pytest.mark.parametrize("key", ["name", "out_dir", "data.root", "distill.cache_dir", "teacher.checkpoint"])
def test_no_nul_byte_in_names_and_paths(tmp_path, key):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f'{key}: "a\\0b"\n' if "." not in key else
                      f'{key.split(".")[0]}: {{{key.split(".")[1]}: "a\\0b"}}\n')
    fails(recipe, [], f"{key}: ")


# ---------------------------------------------------------------- 6. a loss type that is not a name

@pytest.mark.parametrize("value", ["{a: 1}", "3", "[kd]", "null"])
def test_loss_type_must_be_a_name(value):
    fails(DIGITS, [f"distill.losses.kd.type={value}"], "distill.losses.kd.type: must be the name of a registered loss")


@pytest.mark.parametrize("label", ["training", "a.b", ""])
def test_loss_labels_that_cannot_name_a_module(label):
    with pytest.raises(KdistillError, match="cannot label a loss term"):
        build_objective({label: {"type": "kd"}})


# ---------------------------------------------------------------- 7. null removes a loss term

def test_null_removes_a_loss_term():
    cfg = load_config(DIGITS, ["distill.losses.kd=null"])
    objective = build_objective(cfg.distill.losses, cfg.distill.temperature)
    assert set(objective.terms) == {"ce"} and objective.weights == {"ce": 0.5}
    assert not objective.needs_teacher


def test_null_removes_a_loss_term_from_python():
    objective = build_objective({"ce": {"weight": 0.3}, "kd": None})
    assert set(objective.terms) == {"ce"}


def test_removing_every_loss_term_is_an_error():
    fails(DIGITS, ["distill.losses.ce=null", "distill.losses.kd=null"], "distill.losses: no loss term left")


# ---------------------------------------------------------------- 8. the student has no checkpoint

def test_student_checkpoint_is_an_unknown_key(tmp_path):
    fails(DIGITS, ["student.checkpoint=x.safetensors"], "student.checkpoint: unknown key")
    assert load_config(DIGITS, ["teacher.checkpoint=t.safetensors"]).teacher.checkpoint == "t.safetensors"


# ---------------------------------------------------------------- 9. train_config applies the same bounds

@pytest.mark.parametrize("options, expected", [
    ({"lr": 1000.0}, "lr: must be > 0 and finite and <= 100"),
    ({"epochs": 10**6}, "epochs: must be >= 1 and <= 100000"),
    ({"lr": 10**400}, "lr: "),
    ({"augment": [1]}, "augment: must be a mapping"),
    ({"warmup_epochs": 9.0, "epochs": 2}, "warmup_epochs: must be >= 0 and finite and <= 2"),
])
def test_train_config_applies_the_bounds(options, expected):
    with pytest.raises(KdistillError) as err:
        train_config(**options)
    assert expected in one_line(err.value)
