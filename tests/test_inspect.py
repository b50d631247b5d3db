"""`kdistill inspect`: every module path with its output shape and parameters, for recipes and models."""

import pytest
import torch
from torch import nn

from kdistill.cli import main
from kdistill.inspection import format_table, module_table, shape_text


class TwoHeads(nn.Module):
    """A module called twice, one never called, and a tuple output."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.shared(self.shared(x.flatten(1))))


def test_every_module_gets_its_output_shape_calls_and_parameters():
    model = TwoHeads().train()
    rows = {row.path: row for row in module_table(model, torch.zeros(2, 1, 2, 2))}
    assert rows[""].output == "3" and rows[""].params == 20 + 10 + 15
    assert (rows["shared"].output, rows["shared"].calls, rows["shared"].params) == ("4", 2, 20)
    assert (rows["shared"].input, rows["head"].input, rows[""].input) == ("4", "4", "1x2x2")
    assert rows["unused"].output == "-" and rows["unused"].calls == 0
    assert model.training and all(m.training for m in model.modules())  # modes put back
    table = format_table(list(rows.values()))
    assert "4 (2 calls)" in table and table.splitlines()[1].startswith("(model)")
    assert shape_text((torch.zeros(2, 3), {"a": torch.zeros(2, 5, 6)})) == "(3, {a: 5x6})"


def test_a_recipe_lists_both_models_on_its_data(capsys):
    assert main(["inspect", "digits_quick"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("teacher: ") and "\nstudent: " in out and "digits (1x8x8)" in out
    assert main(["inspect", "digits_quick", "student.name=mlp", "student.kwargs={hidden: [7]}", "--role",
                 "student"]) == 0
    out = capsys.readouterr().out
    assert "teacher" not in out and "body.fc1" in out and " 7 " in out


def test_a_model_by_name_with_its_arguments(capsys):
    assert main(["inspect", "resnet", "width=4", "depth=1", "--input-shape", "3,32,32", "--classes", "5"]) == 0
    out = capsys.readouterr().out
    assert "stages.2.0.conv2" in out and "16x8x8" in out and "head" in out


@pytest.mark.parametrize("argv, message", [
    (["inspect", "resnet", "--input-shape", "32,32"], "--input-shape is channels,height,width"),
    (["inspect", "resnet", "--classes", "0"], "--classes must be at least 1"),
    (["inspect", "resnet", "widht=4"], "does not take argument 'widht'"),
    (["inspect", "resnet", "4"], "model arguments are name=value"),
    (["inspect", "no_such_recipe_or_model"], "no_such_recipe_or_model"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
