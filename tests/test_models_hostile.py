"""Hostile model specs: a recipe must not run code through a model name, and a broken or absurd model is one line."""

import pytest
import torch
from torch import nn

from kdistill.cli import main
from kdistill.errors import KdistillError
from kdistill.models import args, count_parameters, create_model, output_classes
from kdistill.models.resnet import resnet_parameters

MNIST = (1, 28, 28)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# --- a model name must not run code -----------------------------------------------------------

def test_os_system_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(KdistillError) as caught:
        create_model("os:system", MNIST, 10, command=f"id > {marker}")
    assert "not a subclass of torch.nn.Module" in one_line(caught)
    assert not marker.exists()


def test_shutil_rmtree_never_runs(tmp_path):
    victim = tmp_path / "victim"
    (victim / "inside").mkdir(parents=True)
    with pytest.raises(KdistillError, match="rmtree is a function"):
        create_model("shutil:rmtree", MNIST, 10, path=str(victim))
    assert (victim / "inside").is_dir()


def test_a_class_that_is_not_a_module_is_never_instantiated(tmp_path):
    marker = tmp_path / "touched"
    with pytest.raises(KdistillError, match="Popen is a class, not a subclass of torch.nn.Module"):
        create_model("subprocess:Popen", MNIST, 10, args=["touch", str(marker)])
    assert not marker.exists()


@pytest.mark.parametrize("role, spec, kwargs", [
    ("teacher", "os:system", "{{command: 'id > {target}'}}"),
    ("student", "shutil:rmtree", "{{path: '{target}'}}"),
])
def test_a_recipe_naming_a_function_exits_with_one_line(capsys, tmp_path, role, spec, kwargs):
    target = tmp_path / ("victim" if spec == "shutil:rmtree" else "pwned")
    if spec == "shutil:rmtree":
        target.mkdir()
    models = {"teacher": "{name: mlp}", "student": "{name: mlp}"}
    models[role] = f"{{name: '{spec}', kwargs: {kwargs.format(target=target)}}}"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data: {{name: digits, val_size: 300}}\nteacher: {models['teacher']}\n"
                      f"student: {models['student']}\n")
    assert main(["run", str(recipe), f"out_dir={tmp_path / 'runs'}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a subclass of torch.nn.Module" in err, err
    assert target.is_dir() if spec == "shutil:rmtree" else not target.exists()


# --- a user model that fails ------------------------------------------------------------------

class Failing(nn.Module):
    """Raises `error` from its forward, or from its constructor when `in_init`."""

    def __init__(self, error: BaseException, in_init: bool = False):
        super().__init__()
        if in_init:
            raise error
        self.error = error
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        raise self.error


ERRORS = [TypeError("forward() takes 1 argument"), ValueError("bad\nsecond line"), IndexError("tuple index"),
          AttributeError("no attribute 'fc9'"), AssertionError("x.dim() == 2"), KeyError("layer"),
          ZeroDivisionError("division by zero")]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_a_failing_forward_is_one_line_naming_model_and_error(error):
    with pytest.raises(KdistillError) as caught:
        output_classes(Failing(error), MNIST)
    message = one_line(caught)
    assert message.startswith("Failing fails on inputs of shape (1, 28, 28)") and type(error).__name__ in message


@pytest.mark.parametrize("error", [*ERRORS, RuntimeError("CUDA missing"), OSError("weights.bin not found")],
                         ids=lambda e: type(e).__name__)
def test_a_failing_constructor_is_one_line_naming_model_and_error(error):
    spec = f"{__name__}:Failing"  # this test module, already imported
    with pytest.raises(KdistillError) as caught:
        create_model(spec, MNIST, 10, error=error, in_init=True)
    message = one_line(caught)
    assert message.startswith(f"model '{spec}' cannot be built") and type(error).__name__ in message


def test_a_module_whose_import_fails_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "broken_nets.py").write_text("import torch\nraise ValueError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KdistillError, match="importing broken_nets failed \\(ValueError: no GPU here\\)") as caught:
        create_model("broken_nets:Net", MNIST, 10)
    one_line(caught)


class Huge(nn.Module):
    def __init__(self, memory_error: bool = False):
        super().__init__()
        if memory_error:
            raise MemoryError()
        self.weight = nn.Parameter(torch.empty(2 ** 50, dtype=torch.uint8), requires_grad=False)  # a petabyte


@pytest.mark.parametrize("memory_error", [False, True])
def test_a_model_too_large_to_allocate_is_one_line(memory_error):
    with pytest.raises(KdistillError) as caught:
        create_model(f"{__name__}:Huge", MNIST, 10, memory_error=memory_error)
    assert "too large for this machine's memory" in one_line(caught)


# --- absurd sizes are refused before allocating -----------------------------------------------

@pytest.mark.parametrize("name, num_classes, kwargs, message", [
    ("mlp", 10, {"hidden": [1_000_000_000]}, r"each at most 1048576"),
    ("mlp", 10, {"hidden": [1] * 1001}, r"at most 1000 of them"),
    ("mlp", 2 ** 20 + 1, {"hidden": [4]}, "num_classes must be a positive integer at most 1048576"),
    ("resnet", 10, {"width": 2 ** 20 + 1, "stages": 1}, "width must be a positive integer at most 1048576"),
    ("resnet", 10, {"width": 1, "depth": 1001}, "depth must be a positive integer at most 1000"),
    ("resnet", 10, {"width": 1, "depth": 1, "stages": 22}, r"width \* 2\*\*\(stages - 1\) channels"),
])
def test_absurd_sizes_are_refused(name, num_classes, kwargs, message):
    with pytest.raises(KdistillError, match=message) as caught:
        create_model(name, (1, 4, 4), num_classes, **kwargs)
    one_line(caught)


@pytest.mark.parametrize("name, shape, kwargs", [
    ("mlp", MNIST, {"hidden": [2 ** 15]}),  # 26M parameters, 103 MB
    ("resnet", MNIST, {"width": 256}),  # 31M parameters
    ("seed_teacher", (1, 512, 512), {}),  # fc1 grows with the image: 134M parameters
])
def test_a_model_larger_than_memory_is_refused_before_it_is_built(monkeypatch, name, shape, kwargs):
    monkeypatch.setattr(args, "available_memory", lambda: 64 * 2 ** 20)
    with pytest.raises(KdistillError, match=r"GiB\), more than the 0.0625 GiB of memory available") as caught:
        create_model(name, shape, 10, **kwargs)
    one_line(caught)


@pytest.mark.parametrize("shape, width, depth, stages", [(MNIST, 8, 1, 3), ((3, 32, 32), 16, 2, 2), (MNIST, 5, 3, 1)])
def test_resnet_parameter_formula_matches_the_model(shape, width, depth, stages):
    model = create_model("resnet", shape, 7, width=width, depth=depth, stages=stages)
    assert resnet_parameters(shape[0], 7, width, depth, stages) == count_parameters(model)
