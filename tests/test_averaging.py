"""train.ema_decay: an exponential moving average of the weights is validated, selected and kept."""

import pytest
import torch
from torch import nn

from kdistill.cli import main
from kdistill.data import BatchLoader, ImageSet
from kdistill.distill import Distiller
from kdistill.losses import cross_entropy_objective
from kdistill.train.averaging import WeightAverage


def test_the_average_follows_the_formula():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    average = WeightAverage(model, 0.9)
    expected = {k: v.clone().float() for k, v in model.state_dict().items()}
    for step in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 3))  # BatchNorm's running statistics and step counter move too
        average.update(step)
        decay = min(0.9, (1 + step) / (10 + step))
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                expected[key] = decay * expected[key] + (1 - decay) * value
            else:
                expected[key] = value.clone()
    for key, value in average.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with average.applied():
        assert torch.equal(model[0].weight, average.shadow["0.weight"])
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())  # given back


def _data():
    generator = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8, generator=generator),
                    torch.randint(0, 3, (64,), generator=generator))


def _student(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_the_kept_weights_are_the_average_and_resume_exactly(tmp_path):
    loader = BatchLoader(_data(), 8, mean=(0.5,), std=(0.25,), shuffle=True)
    val = BatchLoader(_data(), 16, mean=(0.5,), std=(0.25,))
    whole = Distiller(None, _student(), cross_entropy_objective())
    result = whole.fit(loader, 3, val_loader=val, lr=0.1, ema_decay=0.8, progress="quiet")
    plain = Distiller(None, _student(), cross_entropy_objective())
    plain.fit(loader, 3, val_loader=val, lr=0.1, progress="quiet")
    assert not torch.equal(whole.student[1].weight, plain.student[1].weight)  # the average, not the last weights
    assert result.best_val_accuracy is not None
    first = Distiller(None, _student(), cross_entropy_objective())
    first.fit(loader, 2, val_loader=val, lr=0.1, ema_decay=0.8, progress="quiet", out_dir=tmp_path)
    again = Distiller(None, _student(seed=1), cross_entropy_objective())
    again.fit(loader, 3, val_loader=val, lr=0.1, ema_decay=0.8, progress="quiet", out_dir=tmp_path, resume=True)
    for key, value in whole.student.state_dict().items():
        assert torch.equal(value, again.student.state_dict()[key]), key


@pytest.mark.parametrize("value", ["1", "0", "-0.5", "true"])
def test_a_bad_decay_is_one_line(tmp_path, capsys, value):
    assert main(["check", "digits_quick", f"out_dir={tmp_path}", f"train.ema_decay={value}"]) == 2
    err = capsys.readouterr().err
    assert "train.ema_decay" in err and err.count("\n") == 1
