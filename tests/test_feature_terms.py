"""Feature and relation terms in recipes: taps by path, connectors from observed shapes, refusals up front."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdistill import Distiller
from kdistill.cli import main
from kdistill.data import BatchLoader, ImageSet
from kdistill.losses import Connector, build_objective
from kdistill.models.registry import create_model

FAST = ["teacher.train.epochs=2", "train.epochs=2", "eval.latency_repeats=1", "eval.latency_batches=[1]"]
# digits_quick: teacher mlp [256, 256], student mlp [16].
HINT = "distill.losses={ce: {weight: 1}, hint: {type: fitnet, student: body.fc1, teacher: body.fc2, weight: 1}}"


def run(tmp_path, *args):
    return main([args[0], "digits_quick", f"out_dir={tmp_path}", *FAST, *args[1:]])


def test_a_fitnet_hint_trains_its_connector_and_leaves_it_out_of_the_student(tmp_path, capsys):
    assert run(tmp_path, "run", HINT) == 0
    err = capsys.readouterr().err
    assert "teacher signal: cached (no augmentation: the teacher's logits and tapped features" in err
    assert "teacher features (body.fc2; " in err
    folder = tmp_path / "digits_quick"
    history = [json.loads(line) for line in (folder / "student" / "metrics.jsonl").read_text().splitlines()]
    assert "train_hint" in history[0] and history[1]["train_hint"] < history[0]["train_hint"]
    weights = load_file(folder / "student" / "model.safetensors")
    assert not any("connector" in key for key in weights)
    assert set(weights) == set(create_model("mlp", (1, 8, 8), 10, hidden=[16]).state_dict())


def test_connectors_are_made_from_the_observed_shapes():
    maps = Connector((8, 8, 8), (16, 4, 4))
    assert maps(torch.zeros(2, 8, 8, 8)).shape == (2, 16, 4, 4)
    assert isinstance(Connector((5,), (5,)).map, torch.nn.Identity)
    assert Connector((5,), (7,))(torch.zeros(3, 5)).shape == (3, 7)
    with pytest.raises(ValueError, match="maps to maps, vectors to vectors"):
        Connector((5,), (3, 4, 4))


@pytest.mark.filterwarnings("ignore:the teacher gets")  # untrained on purpose
def test_every_feature_term_trains_a_resnet_student_against_a_resnet_teacher():
    generator = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (48, 1, 12, 12), dtype=torch.uint8, generator=generator),
                    torch.randint(0, 3, (48,), generator=generator))
    teacher = create_model("resnet", (1, 12, 12), 3, width=8, depth=1)
    student = create_model("resnet", (1, 12, 12), 3, width=4, depth=1)
    losses = {
        "ce": {},
        "hint": {"type": "fitnet", "student": "stages.1", "teacher": "stages.2"},
        "at": {"student": "stages.1", "teacher": "stages.1"},
        "sp": {"student": "stages.2", "teacher": "stages.2"},
        "nst": {"student": "stages.2", "teacher": "stages.1"},
        "rkd_distance": {"student": "head", "teacher": "head"},
        "rkd_angle": {"student": "stages.2", "teacher": "head"},
        "pkt": {"student": "head", "teacher": "stages.2"},
        "cc": {"student": "stages.2", "teacher": "stages.2", "dim": 16},
        "fsp": {"student": ["stages.1.0.conv1", "stages.1.0.conv2"], "teacher": ["stages.0.0.conv1", "stages.0"]},
    }
    distiller = Distiller(teacher, student, build_objective(losses))
    loader = BatchLoader(data, 16, mean=(0.5,), std=(0.25,), shuffle=True)
    result = distiller.fit(loader, epochs=1, lr=0.01, progress="quiet")
    assert all(f"train_{label}" in result.history[0] for label in losses)
    assert all(torch.isfinite(torch.tensor(result.history[0][f"train_{label}"])) for label in losses)
    assert distiller.objective.terms["hint"].connector.map[0].weight.shape == (32, 8, 1, 1)  # 8 -> 32 channels


@pytest.mark.parametrize("losses, message", [
    ("{hint: {type: fitnet, student: body.fc9, teacher: body.fc2}}",
     "no module 'body.fc9' in MLP (the student, mlp) for distill.losses (nearest: body.fc1"),
    ("{hint: {type: fitnet, student: body.fc1, teacher: bdy.fc2}}", "(the teacher, mlp) for distill.losses"),
    ("{at: {student: body.fc1, teacher: body.fc2}}",
     "distill.losses.at: attention_transfer compares feature maps [N, C, H, W]"),
    ("{sp: {student: body.fc1@output, teacher: body.fc2}}",
     "tap 'body.fc1@output': '@output' is not a side of a module; write body.fc1 for its output or body.fc1@input"),
    ("{hint: {type: fitnet, student: body, teacher: body.fc1}}", None),
    ("{ce: {}, rkd_distance: {student: body.fc1, teacher: body.fc2@input}}", None),  # cached, on what fc2 receives
])
def test_bad_taps_are_one_line_before_any_training(tmp_path, capsys, losses, message):
    code = run(tmp_path, "run", f"distill.losses={losses}")
    if message is None:  # a valid recipe, for contrast
        assert code == 0
        return
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "digits_quick" / "teacher").exists()


def test_inspect_names_what_to_tap(capsys):
    assert main(["inspect", "digits_quick", "--role", "student"]) == 0
    assert "body.fc1" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:the teacher gets")  # untrained on purpose
def test_a_resumed_training_restores_the_connector(tmp_path):
    generator = torch.Generator().manual_seed(1)
    data = ImageSet(torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8, generator=generator),
                    torch.randint(0, 3, (32,), generator=generator))
    loader = BatchLoader(data, 8, mean=(0.5,), std=(0.25,), shuffle=True)
    teacher = create_model("resnet", (1, 8, 8), 3, width=8, depth=1)
    losses = {"ce": {}, "hint": {"type": "fitnet", "student": "stages.0", "teacher": "stages.1"}}

    def distiller(init_seed=0):
        torch.manual_seed(init_seed)
        return Distiller(teacher, create_model("resnet", (1, 8, 8), 3, width=4, depth=1), build_objective(losses))

    whole = distiller()
    whole.fit(loader, epochs=2, lr=0.05, progress="quiet", seed=0)
    first = distiller()
    first.fit(loader, epochs=1, lr=0.05, progress="quiet", seed=0, out_dir=tmp_path)
    again = distiller(init_seed=1)  # other initial weights: only a real resume gives `whole`'s
    again.fit(loader, epochs=2, lr=0.05, progress="quiet", seed=0, out_dir=tmp_path, resume=True)
    for key, value in whole.objective.state_dict().items():
        assert torch.equal(value, again.objective.state_dict()[key]), key
    for key, value in whole.student.state_dict().items():
        assert torch.equal(value, again.student.state_dict()[key]), key


def test_a_tap_on_a_tuple_names_its_elements_and_takes_one():
    from kdistill.distill import FeatureTaps

    outer = Wrapper()
    whole = FeatureTaps(outer, ["lstm"])
    outer(torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match=r"tap 'lstm': lstm returns a tuple of 2 \(tensor of shape \(2, 5, 3\), "
                                         r"tuple of 2 .*not a tensor; tap one element of it: lstm#0, lstm#1"):
        whole.pop()
    picked = FeatureTaps(outer, ["lstm#0", "lstm#1#0"])
    outer(torch.zeros(2, 5, 4))
    features = picked.pop()
    assert features["lstm#0"].shape == (2, 5, 3) and features["lstm#1#0"].shape == (1, 2, 3)
    wrong = FeatureTaps(outer, ["lstm#2"])
    outer(torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="'2' names no element"):
        wrong.pop()


def test_a_tap_takes_what_a_module_receives():
    """`head@input`: the pooled embedding, though the pooling is a function call in forward, not a module."""
    from kdistill.distill import FeatureTaps

    model = create_model("resnet", (1, 8, 8), 3, width=4, depth=1)
    taps = FeatureTaps(model, ["stages.2", "head@input"])
    model(torch.randn(2, 1, 8, 8))
    features = taps.pop()
    assert features["head@input"].shape == (2, 16)
    torch.testing.assert_close(features["head@input"], features["stages.2"].mean((2, 3)))


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 3, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0][:, -1]


RECURRENT = '''
import torch
from torch import nn


class Recurrent(nn.Module):
    """Rows of an image as a sequence: an LSTM, whose output is a tuple, then a linear head."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.lstm = nn.LSTM(input_shape[2], 16, batch_first=True)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.lstm(x.flatten(1, 2))[0][:, -1])
'''


@pytest.mark.parametrize("tap, message", [
    ("lstm", "distill.losses (student): tap 'lstm': lstm returns a tuple of 2 (tensor of shape (2, 8, 16), tuple "
             "of 2 (tensor of shape (1, 2, 16), tensor of shape (1, 2, 16))), not a tensor; tap one element of it: "
             "lstm#0, lstm#1"),
    ("lstm#0", "distill.losses.sp: similarity_preserving: student and teacher features must share the batch"),
    ("lstm#1#0", "distill.losses.sp: similarity_preserving: student and teacher features must share the batch"),
])
def test_a_recipe_chooses_the_element_of_a_tuple_output(tmp_path, capsys, monkeypatch, tap, message):
    (tmp_path / "recurrent.py").write_text(RECURRENT)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = run(tmp_path, "run", "student.name=recurrent:Recurrent", "student.kwargs={}",
               f"distill.losses={{ce: {{}}, sp: {{student: '{tap}', teacher: body.fc1}}}}")
    err = capsys.readouterr().err
    if tap == "lstm#0":  # [N, 8, 16]: fine for SP, which flattens; it runs
        assert code == 0, err
        return
    if tap == "lstm#1#0":  # h_n is [layers, N, 16]: the batch is not first, and SP says so
        assert code == 2 and message in err and err.count("\n") == 1
        return
    assert code == 2 and err.strip() == f"kdistill: error: {message}"


def test_a_pair_no_connector_can_join_is_one_line(tmp_path, capsys):
    code = run(tmp_path, "run", "student.name=resnet", "student.kwargs={width: 4, depth: 1}",
               "distill.losses={ce: {}, hint: {type: fitnet, student: stages.0, teacher: body.fc1}}")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert ("distill.losses.hint: no connector maps a student feature of shape (4, 8, 8) to a teacher feature of "
            "shape (256,) (maps to maps, vectors to vectors)") in err
