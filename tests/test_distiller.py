"""The Distiller and the teacher signals: Python API, frozen teacher, cached == live, taps."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdistill import Distiller
from kdistill.data import BatchLoader, ImageSet
from kdistill.distill import CachedTeacher, FeatureTaps, LiveTeacher, soft_label_key, teacher_logits
from kdistill.errors import KdistillError
from kdistill.losses import DistillInputs, LossTerm, build_objective
from kdistill.models.registry import create_model
from kdistill.storage import atomic_write


def mlp(hidden=16, dropout=0.0):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Dropout(dropout), nn.Linear(hidden, 3))


def toy_images(n=64):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=generator)
    return ImageSet(images, images.float().mean((1, 2, 3)).div(86).long().clamp(max=2))


@pytest.mark.filterwarnings("ignore:the teacher gets")  # an untrained teacher, on purpose
def test_python_api_with_a_plain_dataloader():
    data = toy_images()
    x = (data.images.float() / 255 - 0.5) / 0.25
    loader = DataLoader(TensorDataset(x, data.labels), batch_size=16, shuffle=True)
    teacher, student = mlp(32), mlp(8)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = Distiller(teacher, student, losses={"ce": {"weight": 0.5}, "kd": {"weight": 0.5}}).fit(
        loader, epochs=3, lr=0.01, progress="quiet")
    assert len(result.history) == 3
    assert {"train_ce", "train_kd"} <= result.history[0].keys()
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    # The teacher ran frozen, in eval mode: BatchNorm statistics untouched; then it is given back as it was.
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())


def test_bad_training_options_are_clear():
    loader = [(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(KdistillError, match="did you mean lr"):
        Distiller(None, mlp(), losses={"ce": {}}).fit(loader, epochs=1, lrr=0.1)
    with pytest.raises(KdistillError, match="epochs: must be >= 1"):
        Distiller(None, mlp(), losses={"ce": {}}).fit(loader, epochs=0)
    with pytest.raises(ValueError, match="need a teacher"):
        Distiller(None, mlp(), losses={"kd": {}})


def test_cached_soft_labels_give_the_same_loss_as_the_live_teacher():
    data = toy_images()
    teacher, student = mlp(32), mlp(8)
    teacher.eval()
    table = teacher_logits(teacher, BatchLoader(data, 10, mean=(0.5,), std=(0.25,)), len(data))
    loader = BatchLoader(data, 16, mean=(0.5,), std=(0.25,), shuffle=True, seed=3)
    live = Distiller(teacher, student, {"kd": {}})
    cached = Distiller(None, student, {"kd": {}}, soft_labels=table)
    assert isinstance(live.signal, LiveTeacher) and isinstance(cached.signal, CachedTeacher)
    student.eval()  # same student output for both calls
    for inputs, labels, index in loader:
        loss_live, _, _ = live.training_step(inputs, labels, index)
        loss_cached, _, _ = cached.training_step(inputs, labels, index)
        torch.testing.assert_close(loss_live, loss_cached)


def test_cache_key_depends_on_weights_images_and_preprocessing():
    data, teacher = toy_images(), mlp()
    key = soft_label_key(teacher, data.images, "normalize(0.5, 0.25)")
    assert key == soft_label_key(teacher, data.images.clone(), "normalize(0.5, 0.25)")
    assert key != soft_label_key(teacher, data.images, "normalize(0.4, 0.25)")
    assert key != soft_label_key(teacher, data.images[:-1], "normalize(0.5, 0.25)")
    with torch.no_grad():
        teacher[1].weight[0, 0] += 1e-3
    assert key != soft_label_key(teacher, data.images, "normalize(0.5, 0.25)")


class FeatureMatch(LossTerm):
    """A term with its own learnable connector, reading tapped features (the shape later terms take)."""

    student_taps = ("1",)
    teacher_taps = ("1",)

    def __init__(self):
        super().__init__()
        self.connector = nn.Linear(8, 32)

    def forward(self, inputs: DistillInputs):
        student = self.connector(inputs.student_features["1"])
        # F.mse_loss saves its target for backward: catches teacher outputs that are inference tensors.
        return F.mse_loss(student, inputs.teacher_features["1"])


@pytest.mark.filterwarnings("ignore:the teacher gets")  # an untrained teacher, on purpose
def test_terms_with_taps_and_parameters_slot_into_the_loop():
    from kdistill.losses import Objective

    data = toy_images()
    teacher, student = mlp(32), mlp(8)
    objective = Objective({"ce": build_objective({"ce": {}}).terms["ce"], "hint": FeatureMatch()},
                          {"ce": 1.0, "hint": 1.0})
    distiller = Distiller(teacher, student, objective, soft_labels=torch.zeros(len(data), 3))
    assert isinstance(distiller.signal, LiveTeacher)  # features need the live teacher
    connector_before = objective.terms["hint"].connector.weight.clone()
    result = distiller.fit(BatchLoader(data, 16, mean=(0.5,), std=(0.25,), shuffle=True), epochs=2,
                           lr=0.01, progress="quiet")
    assert "train_hint" in result.history[0]
    assert not torch.equal(connector_before, objective.terms["hint"].connector.weight)


def test_taps_report_unknown_paths():
    named = create_model("mlp", (1, 4, 4), 3, hidden=[8, 8])
    with pytest.raises(KdistillError, match=r"no module 'body.fc9' in MLP to tap \(nearest: body.fc2, body.fc1, body;"):
        FeatureTaps(named, ["body.fc9"])
    with pytest.raises(KdistillError, match=r"no module 'zzz' .*\(it has body, body.fc1, .*kdistill inspect RECIPE"):
        FeatureTaps(named, ["zzz"])
    taps = FeatureTaps(mlp(), ["1"])
    taps.remove()


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model.safetensors"

    def crash(tmp):
        open(tmp, "wb").write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert list(tmp_path.iterdir()) == []


def test_an_unlabelled_batch_trains_label_free_terms_and_is_refused_by_terms_that_read_labels():
    student, table = mlp(8), torch.randn(64, 3)
    inputs, index = torch.randn(16, 1, 4, 4), torch.arange(16)
    loss, _, terms = Distiller(None, student, {"kd": {}, "js": {"weight": 0.5}}, soft_labels=table).training_step(
        inputs, None, index)
    assert torch.isfinite(loss) and set(terms) == {"kd", "js"}
    for losses, named in (({"ce": {"weight": 0.1}, "kd": {"weight": 0.9}}, "distill.losses.ce"),
                          ({"dkd": {}}, "distill.losses.dkd")):
        with pytest.raises(KdistillError, match=f"no labels, but the true class is read by {named}"):
            Distiller(None, mlp(8), losses, soft_labels=table).training_step(inputs, None, index)
    # A term switched off (weight 0) does not count.
    Distiller(None, mlp(8), {"ce": {"weight": 0}, "kd": {}}, soft_labels=table).training_step(inputs, None, index)
