"""Configuration a newcomer can find: `kdistill config`, built-in recipes by name, model switches."""

import pytest
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
    saved = tmp_path / "mine.yaml"
    saved.write_text(text)  # `kdistill config R > mine.yaml`, then `kdistill run mine.yaml`
    expected = load_config("seed_fashion_mnist", ["train.lr=0.02"])
    assert OmegaConf.to_container(load_config(saved)) == OmegaConf.to_container(expected)


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


def test_help_points_to_config(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "kdistill config RECIPE" in out and "built-in recipe" in out


def test_a_new_model_name_drops_the_old_models_kwargs():
    assert load_config("fashion_mnist_resnet").teacher.kwargs == {"width": 32, "depth": 2}
    assert load_config("fashion_mnist_resnet", ["teacher.name=seed_teacher"]).teacher.kwargs == {}
    given = load_config("fashion_mnist_resnet", ["teacher.kwargs.hidden=[8]", "teacher.name=mlp"])
    assert OmegaConf.to_container(given.teacher.kwargs) == {"hidden": [8]}
    same = load_config("fashion_mnist_resnet", ["teacher.name=resnet"])  # not another model: kept
    assert same.teacher.kwargs == {"width": 32, "depth": 2}


def test_a_misspelt_user_class_gets_a_suggestion(tmp_path, monkeypatch):
    (tmp_path / "ux_student_nets.py").write_text("from torch import nn\n"
                                         "class TinyStudent(nn.Linear):\n"
                                         "    def __init__(self, num_classes):\n"
                                         "        super().__init__(64, num_classes)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KdistillError, match="ux_student_nets has no TinyStudnet; did you mean 'TinyStudent'"):
        create_model("ux_student_nets:TinyStudnet", (1, 8, 8), 10)
    with pytest.raises(KdistillError, match="is the module on PYTHONPATH"):
        create_model("not_a_module_here:TinyStudent", (1, 8, 8), 10)


def test_list_models_shows_arguments(capsys):
    assert main(["list", "models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("mlp ") and "(args: hidden=(1200, 1200), dropout=0.0)" in line for line in lines)
    assert any(line.startswith("resnet8x4 ") and "args" not in line for line in lines)


def test_annotated_yaml_keeps_list_items_plain():
    text = annotated_yaml(load_config("cifar100_resnet32x4_resnet8x4"))
    assert "\n  - 150\n" in text or "\n    - 150\n" in text
