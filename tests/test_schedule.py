"""The learning-rate schedules, as pure functions of the step."""

import pytest

from kdistill.config.loading import train_config
from kdistill.errors import KdistillError
from kdistill.train.optim import learning_rate


def test_multistep_decays_at_each_milestone():
    """The CIFAR protocol: x0.1 at epochs 150, 180 and 210 of 240."""
    cfg = train_config(epochs=240, lr=0.05, schedule="multistep", milestones=[150, 180, 210], step_gamma=0.1)
    steps = 10
    expected = {0: 0.05, 150 * steps - 1: 0.05, 150 * steps: 0.005, 180 * steps: 0.0005, 210 * steps: 0.00005,
                240 * steps - 1: 0.00005}
    for step, lr in expected.items():
        assert learning_rate(cfg, step, steps) == pytest.approx(lr)


def test_step_and_cosine_unchanged():
    step = train_config(epochs=10, lr=1.0, schedule="step", step_epochs=3, step_gamma=0.5)
    assert [learning_rate(step, e * 4, 4) for e in (0, 3, 6, 9)] == [1.0, 0.5, 0.25, 0.125]
    cosine = train_config(epochs=10, lr=1.0, schedule="cosine")
    assert learning_rate(cosine, 0, 4) == 1.0 and learning_rate(cosine, 20, 4) == pytest.approx(0.5)


@pytest.mark.parametrize("options, message", [
    ({"schedule": "multistep"}, "milestones: the multistep schedule needs epochs"),
    ({"schedule": "multistep", "milestones": [5, 3]}, "milestones: must be increasing"),
    ({"schedule": "multistep", "milestones": [50]}, r"milestones\[0\]: must be >= 1 and <= 10"),
])
def test_bad_milestones(options, message):
    with pytest.raises(KdistillError, match=message):
        train_config(epochs=10, **options)
