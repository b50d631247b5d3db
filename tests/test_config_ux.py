"""Configuration a newcomer can find: `kdistill config`, built-in recipes by name, model switches."""

import pytest
import yaml
from omegaconf import OmegaConf

from kdistill.cli import main
from kdistill.config import load_config
from kdistill.config.describe import annotated_yaml, builtin_recipes, key_help
from kdistill.config.loading import _defaults
from kdistill.errors import KdistillError
from kdistill.models import create_model

FREE_FORM = ("kwargs", "losses")  # maps whose keys the schema does not know


def schema_keys(node=None, prefix=""):
    node = _defaults() if node is None else node
    for key in node:
        path = f"{prefix}{key}"
        yield path
        if OmegaConf.is_dict(node._get_node(key)) and key not in FREE_FORM:
            yield from schema_keys(node[key], f"{path}.")


def test_every_schema_key_has_help():
    helps = key_help()
    assert [key for key in schema_keys() if not helps.get(key)] == []
    assert helps["data.val_size"].startswith("validation images carved from the training set")
    assert helps["teacher.name"] == helps["student.name"]  # inherited from the student's schema


def test_config_prints_valid_yaml_with_help(tmp_path, capsys):
    assert main(["config", "seed_fashion_mnist", "train.lr=0.02"]) == 0
    text = capsys.readouterr().out
    assert "  lr: 0.02" in text and "# peak learning rate" in text and "# a registered data set" in text
    assert "  kwargs: {}  " in text and "# passed to the model's builder" in text
    assert [line for line in text.splitlines() if line.startswith("    ce:")] == ["    ce:"]  # a free-form key: no help
    saved = tmp_path / "mine.yaml"
    saved.write_text(text)  # `kdistill config R > mine.yaml`, then `kdistill run mine.yaml`
    expected = load_config("seed_fashion_mnist", ["train.lr=0.02"])
    assert OmegaConf.to_container(load_config(saved)) == OmegaConf.to_container(expected)


def test_a_printed_config_runs(tmp_path, capsys, soft_label_cache):
    fast = ["train.epochs=1", "teacher.train.epochs=1", "eval.latency_repeats=1", "eval.latency_batches=[1]"]
    assert main(["config", "digits_quick", f"out_dir={tmp_path / 'runs'}", *fast]) == 0
    saved = tmp_path / "mine.yaml"
    saved.write_text(capsys.readouterr().out)
    assert main(["run", str(saved), "--quiet"]) == 0
    assert (tmp_path / "runs" / "digits_quick" / "report.md").exists()


def test_config_takes_no_training_flags(capsys):
    with pytest.raises(SystemExit):
        main(["config", "digits_quick", "--resume"])
    assert "unrecognized arguments: --resume" in capsys.readouterr().err


def test_built_in_recipes_by_name(capsys):
    assert set(builtin_recipes()) >= {"seed_fashion_mnist", "demo_fashion_mnist", "digits_quick"}
    assert load_config("digits_quick").name == "digits_quick"
    with pytest.raises(KdistillError, match="did you mean 'digits_quick'.*built-in recipes: "):
        load_config("digit_quick")
    with pytest.raises(KdistillError, match="recipe nowhere/x.yaml not found"):
        load_config("nowhere/x.yaml")
    assert main(["list", "recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("demo_fashion_mnist") and "first-hour demo" in line for line in lines)
    assert main(["list"]) == 0
    everything = capsys.readouterr().out
    assert everything.startswith("recipes:\n") and "\n  digits_quick  " in everything and "\nmodels:\n" in everything


def test_help_points_to_config(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "kdistill config RECIPE" in out and "built-in recipe" in out
    assert "'student.kwargs={hidden: [800]}' replace the whole map" in out


def test_a_new_model_name_drops_the_old_models_kwargs():
    assert load_config("fashion_mnist_resnet").teacher.kwargs == {"width": 32, "depth": 2}
    assert load_config("fashion_mnist_resnet", ["teacher.name=seed_teacher"]).teacher.kwargs == {}
    given = load_config("fashion_mnist_resnet", ["teacher.kwargs.hidden=[8]", "teacher.name=mlp"])
    assert OmegaConf.to_container(given.teacher.kwargs) == {"hidden": [8]}
    same = load_config("fashion_mnist_resnet", ["teacher.name=resnet"])  # not another model: kept
    assert same.teacher.kwargs == {"width": 32, "depth": 2}
    as_map = load_config("fashion_mnist_resnet", ["teacher={name: mlp}"])
    assert as_map.teacher.kwargs == {}


def test_a_map_value_replaces_a_free_form_map():
    def kwargs(*overrides):
        return OmegaConf.to_container(load_config("fashion_mnist_resnet", overrides).teacher.kwargs)

    assert kwargs("teacher.kwargs.depth=3") == {"width": 32, "depth": 3}  # one key: merged
    assert kwargs("teacher.kwargs={depth: 3}") == {"depth": 3}  # a map: replaced
    assert kwargs("teacher.kwargs={}") == {}
    assert kwargs("teacher.kwargs={depth: 3}", "teacher.kwargs.width=16") == {"depth": 3, "width": 16}


def test_a_map_value_replaces_the_loss_terms():
    def losses(*overrides):
        return OmegaConf.to_container(load_config("seed_fashion_mnist", overrides).distill.losses)

    assert losses("distill.losses.kd.weight=1") == {"ce": {"weight": 0.5}, "kd": {"weight": 1}}
    assert losses("distill.losses={kd: {weight: 1}}") == {"kd": {"weight": 1}}
    assert losses("distill.losses.kd={temperature: 2}") == {"ce": {"weight": 0.5}, "kd": {"temperature": 2}}
    assert losses("distill.losses.kd=null") == {"ce": {"weight": 0.5}, "kd": None}
    assert losses("distill.losses={}") == {"ce": {"weight": 0.5}, "kd": {"weight": 0.5}}  # empty: the default


def test_schema_sections_still_merge():
    cfg = load_config("fashion_mnist_resnet", ["teacher.train.augment={hflip: false}"])
    assert (cfg.teacher.train.augment.crop_padding, cfg.teacher.train.augment.hflip) == (2, False)


def test_a_misspelt_user_class_gets_a_suggestion(tmp_path, monkeypatch):
    (tmp_path / "ux_student_nets.py").write_text("from torch import nn\n"
                                                 "class TinyStudent(nn.Linear):\n"
                                                 "    def __init__(self, num_classes):\n"
                                                 "        super().__init__(64, num_classes)\n"
                                                 "    class Head(nn.Linear):\n"
                                                 "        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KdistillError, match="ux_student_nets has no TinyStudnet; did you mean 'TinyStudent'"):
        create_model("ux_student_nets:TinyStudnet", (1, 8, 8), 10)
    with pytest.raises(KdistillError, match="has no TinyStudent.Haed; did you mean 'Head'"):
        create_model("ux_student_nets:TinyStudent.Haed", (1, 8, 8), 10)
    with pytest.raises(KdistillError, match="cannot import not_a_module_here .*PYTHONPATH"):
        create_model("not_a_module_here:TinyStudent", (1, 8, 8), 10)
    with pytest.raises(KdistillError, match="cannot import ux_student_nets.deeper .*PYTHONPATH"):
        create_model("ux_student_nets.deeper:TinyStudent", (1, 8, 8), 10)


@pytest.mark.parametrize("body, error", [("import os\nos.no_such_name\n", "AttributeError"),
                                         ("from os import no_such_name\n", "ImportError"),
                                         ("import no_such_module_either\n", "ModuleNotFoundError")])
def test_a_module_that_fails_to_import_is_not_a_path_problem(tmp_path, monkeypatch, body, error):
    name = f"ux_broken_{error.lower()}"
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KdistillError, match=f"importing {name} failed \\({error}: .*; fix the module$"):
        create_model(f"{name}:Net", (1, 8, 8), 10)


def test_list_models_shows_arguments(capsys):
    assert main(["list", "models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("mlp ") and "  (args: hidden=[1200, 1200], dropout=0.0)" in line for line in lines)
    assert any(line.startswith("seed_teacher ") and "args" not in line for line in lines)  # a builder without any


def test_annotated_yaml_keeps_list_items_plain():
    text = annotated_yaml(load_config("cifar100_resnet32x4_resnet8x4"))
    assert "\n  - 150\n" in text or "\n    - 150\n" in text


def test_annotated_yaml_of_a_long_value_stays_valid_yaml():
    # PyYAML folds a long value onto the next line: a help comment appended to the first would cut it.
    root = "/data/" + " ".join(["folder"] * 30)
    cfg = load_config("digits_quick", [f"data.root='{root}'"])
    assert yaml.safe_load(annotated_yaml(cfg))["data"]["root"] == root


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_built_in_recipe_is_valid(name):
    assert load_config(name).name == name
