"""Property: whatever a user types, `kdistill check` answers with a plan (exit 0) or one line (exit 2),
and what `kdistill config` prints loads back as the same config.

`check` runs everything `run` checks before its first epoch (config, data, models, paths) and
writes nothing, so random override lists can be thrown at it by the hundred. More examples:
KDISTILL_FUZZ_EXAMPLES=5000.
"""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from kdistill.cli import main
from kdistill.config import load_config
from kdistill.data import download

DIGITS = "recipes/digits_quick.yaml"
EXAMPLES = int(os.environ.get("KDISTILL_FUZZ_EXAMPLES", 150))

NUMBERS = st.one_of(
    st.integers(-3, 40), st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2**31, 2**63, 2**64 + 5]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e300, -0.0, 5e-324, 0.5, 1.5]),
)
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
SCALARS = st.one_of(NUMBERS, st.booleans(), st.none(), TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(TEXT, inner, max_size=2)), max_leaves=5)

KEYS = [
    "name", "out_dir", "seed", "threads", "data.name", "data.val_size", "data.split_seed", "data.root",
    "data.channels", "data.image_size", "data.test_size", "data.max_val_size", "train.milestones",
    "teacher.name", "teacher.kwargs", "teacher.kwargs.hidden", "teacher.checkpoint", "teacher.train.epochs",
    "teacher.train.lr", "teacher.train.optimizer", "teacher.train.augment.crop_padding", "student.name",
    "student.kwargs.hidden", "student.kwargs.dropout", "student.checkpoint", "train.batch_size", "train.optimizer",
    "train.precision", "train.schedule", "train.augment", "train.augment.hflip", "train.augment.crop_padding",
    "train.warmup_epochs", "train.grad_clip", "train.momentum", "train.label_smoothing", "train.early_stop_patience",
    "distill.temperature", "distill.losses", "distill.losses.kd", "distill.losses.kd.weight",
    "distill.losses.kd.temperature", "distill.losses.kd.type", "distill.losses.ce.label_smoothing",
    "distill.losses.extra.type", "distill.losses.kd.foo", "distill.normalize_weights", "distill.cache_dir",
    "eval.latency_batches", "eval.latency_batches[0]", "eval.batch_size", "eval.latency_repeats",
    "device", "data.on_device", "train.compile", "train.log_every_steps", "train.checkpoint_every_steps",
    "teacher.train.precision",
    "teacher.trian.epochs", "distill.temperatur", "foo.bar", "", ".", "train..lr",
]
PATH_KEYS = ["out_dir", "data.root", "teacher.checkpoint", "distill.cache_dir", "name"]
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("KDISTILL_FUZZ_EXAMPLES"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("the tests are offline")
    monkeypatch.setattr(download, "urlopen", refuse)


def render(value) -> str:
    """A value as a user might type it: JSON (which is YAML) or raw text."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return str(value)


@st.composite
def override_lists(draw, places):
    overrides = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["value", "value", "path", "raw"]))
        if kind == "path":
            key, target = draw(st.sampled_from(PATH_KEYS)), draw(st.sampled_from(sorted(places)))
            overrides.append(f"{key}={places[target]}")
        elif kind == "raw":
            overrides.append(draw(st.text(max_size=20).filter(lambda t: "\x00" not in t)))
        else:
            overrides.append(f"{draw(st.sampled_from(KEYS))}={render(draw(VALUES))}")
    return overrides


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("places")
    (root / "a_file").write_text("not a folder")
    (root / "a_folder").mkdir()
    return {"file": root / "a_file", "folder": root / "a_folder", "missing": root / "missing" / "deeper",
            "long": root / ("x" * 300), "runs": root / "runs", "dots": "..", "relative": "runs/../runs"}


@FUZZ
@given(data=st.data())
def test_any_override_list_is_a_plan_or_one_line(data, places, capsys, soft_label_cache):
    overrides = data.draw(override_lists(places))
    code = main(["check", DIGITS, f"out_dir={places['runs']}", *overrides, "data.download=false"])
    out, err = capsys.readouterr()
    assert code in (0, 2), (overrides, err)
    if code == 0:
        assert out.startswith("run folder: "), (overrides, out)
    else:
        assert err.startswith("kdistill: error: ") and len(err.strip().splitlines()) == 1, (overrides, err)
    assert not (places["runs"]).exists()  # check writes nothing


@FUZZ
@given(data=st.data())
def test_a_printed_config_loads_back_the_same(data, places, capsys, tmp_path):
    """`kdistill config R overrides > mine.yaml`: mine.yaml is the same config, help comments and all."""
    overrides = data.draw(override_lists(places))
    code = main(["config", DIGITS, *overrides])
    out, err = capsys.readouterr()
    assert code in (0, 2), (overrides, err)
    if code == 2:
        assert err.startswith("kdistill: error: ") and len(err.strip().splitlines()) == 1, (overrides, err)
        return
    saved = tmp_path / "printed.yaml"
    saved.write_text(out, encoding="utf-8")
    expected = OmegaConf.to_container(load_config(DIGITS, overrides), resolve=True)
    assert OmegaConf.to_container(load_config(saved), resolve=True) == expected, (overrides, out)
