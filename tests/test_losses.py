"""Loss-term modules and objectives: the weighting of seed 000 and seed 002, names, taps."""

import math

import pytest
import torch

from kdistill import functional as KF
from kdistill.errors import KdistillError
from kdistill.losses import LOSSES, DistillInputs, build_objective

S = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
T = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
Y = torch.tensor([0, 1])


def inputs():
    return DistillInputs(student_logits=S, labels=Y, teacher_logits=T)


def test_registry_names():
    assert {"ce", "kd", "soft_ce", "logit_mse", "tang"} <= LOSSES.keys()
    assert all(info.description for info in LOSSES.values())


def test_seed_000_objective_is_alpha_ce_plus_one_minus_alpha_kd():
    alpha, temperature = 0.3, 4.0
    objective = build_objective({"ce": {"weight": alpha}, "kd": {"weight": 1 - alpha}}, temperature)
    total, terms = objective(inputs())
    expected = alpha * KF.cross_entropy(S, Y) + (1 - alpha) * KF.kd_div(S, T, temperature)
    torch.testing.assert_close(total, expected)
    assert set(terms) == {"ce", "kd"}
    torch.testing.assert_close(terms["kd"], KF.kd_div(S, T, temperature))


def test_seed_002_objective_is_a_normalised_weighted_average():
    alpha, beta = 0.9, 0.1
    objective = build_objective({"kd": {"weight": alpha}, "ce": {"weight": beta}}, 3.0, normalize=True)
    total, _ = objective(inputs())
    expected = (alpha * KF.kd_div(S, T, 3.0) + beta * KF.cross_entropy(S, Y)) / (alpha + beta)
    torch.testing.assert_close(total, expected)


def test_terms_use_default_temperature_unless_given_their_own():
    objective = build_objective({"a": {"type": "kd"}, "b": {"type": "kd", "temperature": 2.0}}, 5.0)
    _, terms = objective(inputs())
    torch.testing.assert_close(terms["a"], KF.kd_div(S, T, 5.0))
    torch.testing.assert_close(terms["b"], KF.kd_div(S, T, 2.0))


def test_every_registered_term_matches_its_function():
    expected = {
        "ce": KF.cross_entropy(S, Y),
        "kd": KF.kd_div(S, T, 4.0),
        "soft_ce": KF.soft_cross_entropy(S, T, 4.0),
        "logit_mse": KF.logit_mse(S, T),
        "tang": KF.tang_interpolation(S, T, 4.0, 0.5),
    }
    for name, value in expected.items():
        _, terms = build_objective({name: {}}, 4.0)(inputs())
        torch.testing.assert_close(terms[name], value, msg=name)


def test_hand_computed_kd_value():
    # Two classes, T = 1: teacher softmax [1/4, 3/4], student [1/2, 1/2].
    # KL = 1/4 ln(1/2) + 3/4 ln(3/2).
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]])
    _, terms = build_objective({"kd": {"temperature": 1.0}})(DistillInputs(s, torch.tensor([0]), t))
    assert terms["kd"].item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-6)


def test_zero_weight_terms_are_skipped_and_teacher_need_follows_weights():
    objective = build_objective({"ce": {"weight": 1.0}, "kd": {"weight": 0.0}})
    assert not objective.needs_teacher
    total, terms = objective(DistillInputs(S, Y))
    assert set(terms) == {"ce"}
    torch.testing.assert_close(total, KF.cross_entropy(S, Y))


def test_all_zero_weights_and_unknown_types_are_errors():
    with pytest.raises(KdistillError, match="at least one loss weight must be > 0"):
        build_objective({"ce": {"weight": 0}})
    with pytest.raises(KdistillError, match="unknown loss 'mse'"):
        build_objective({"x": {"type": "mse"}})
    with pytest.raises(KdistillError, match="must be a finite number"):
        build_objective({"kd": {"temperature": "hot"}})
