"""kdistill.compare (the Python side of `kdistill run`'s table) and the notes under the table."""

import pytest
import torch
from torch import nn

import kdistill
from kdistill.data import BatchLoader, load_data
from kdistill.evaluation import busy_latency_note
from kdistill.models import create_model
from kdistill.report import class_table, result_lines


@pytest.fixture(scope="module")
def trained():
    """The whole path in code, as the README shows it, on the digits: teacher, baseline, distilled student."""
    data = load_data("digits", val_size=300)
    train = BatchLoader(data.train, 64, mean=data.mean, std=data.std, shuffle=True)
    test = BatchLoader(data.test, 100, mean=data.mean, std=data.std)
    torch.manual_seed(0)
    teacher = create_model("mlp", data.input_shape, 10, hidden=[128])
    kdistill.Distiller(None, teacher, losses={"ce": {}}).fit(train, epochs=3, lr=0.003, progress="quiet")
    torch.manual_seed(0)
    baseline = create_model("mlp", data.input_shape, 10, hidden=[8])
    torch.manual_seed(0)
    student = create_model("mlp", data.input_shape, 10, hidden=[8])
    kdistill.Distiller(None, baseline, losses={"ce": {}}).fit(train, epochs=2, lr=0.003, progress="quiet")
    kdistill.Distiller(teacher, student, losses={"ce": {"weight": 0.5}, "kd": {"weight": 0.5}}).fit(
        train, epochs=2, lr=0.003, progress="quiet")
    return teacher, baseline, student, test


def test_compare_prints_the_command_lines_table(trained):
    teacher, baseline, student, test = trained
    result = kdistill.compare(teacher=teacher, baseline=baseline, student=student, test_loader=test, device="cpu",
                              latency_batches=[1], latency_repeats=3)
    text = str(result)
    assert text.splitlines()[0].startswith("| model | arch | test acc |")
    assert "| teacher | MLP |" in text and "| student distilled | MLP |" in text and "CPU b1 (ms)" in text
    assert "gap recovered:" in text
    metrics = result.metrics
    assert metrics["teacher"]["agreement"] == 1.0 and 0 < metrics["student"]["agreement"] <= 1
    assert len(metrics["student"]["class_accuracy"]) == 10
    # The teacher's accuracy is its mean per-class accuracy weighted by class counts.
    labels = torch.cat([batch.labels for batch in test])
    counts = torch.bincount(labels, minlength=10).double()
    weighted = sum(a * n for a, n in zip(metrics["teacher"]["class_accuracy"], counts.tolist(), strict=True))
    assert weighted / len(labels) == pytest.approx(metrics["teacher"]["test_accuracy"])


def test_compare_leaves_models_where_they_were(trained):
    teacher, _, student, test = trained
    teacher.train()
    kdistill.compare(teacher=teacher, student=student, test_loader=test, device="cpu", latency_batches=[1],
                     latency_repeats=2)
    assert teacher.training and next(teacher.parameters()).device.type == "cpu"


@pytest.mark.parametrize("kwargs, message", [
    ({}, "at least one of teacher=, baseline=, student="),
    ({"student": "model.pt"}, "student must be a torch.nn.Module, got str"),
])
def test_compare_refuses_bad_arguments(kwargs, message):
    with pytest.raises(kdistill.KdistillError, match=message):
        kdistill.compare(test_loader=[(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))], **kwargs)


def test_compare_refuses_an_empty_loader():
    with pytest.raises(kdistill.KdistillError, match="yields no batches"):
        kdistill.compare(student=nn.Linear(2, 2), test_loader=[])


def metrics_with(spread: float, load: float | None) -> dict:
    return {"student": {"latency_spread": {"batch_1": 0.01, "batch_256": spread}},
            "latency_machine": {"load_average": load, "cpus": 2}}


def test_latency_on_a_busy_machine_is_flagged():
    assert busy_latency_note(metrics_with(0.05, 1.9)) is None
    noisy = busy_latency_note(metrics_with(0.40, 1.9))
    assert "busy machine" in noisy and "up to 40 %" in noisy and "load average 1.9 on 2 CPUs" in noisy
    assert "busy machine" in busy_latency_note(metrics_with(0.05, 4.5))  # others competed for the CPUs
    assert busy_latency_note(metrics_with(0.40, None)).startswith("latency measured on a busy machine (rounds")
    assert busy_latency_note({"student": {}}) is None  # metrics written before spreads were kept


def test_result_lines_say_why_the_gap_is_undefined():
    undefined = {"gap_recovered": None, "gap_recovered_note": "undefined: the teacher is not ahead of the baseline"}
    assert result_lines(undefined) == ["gap recovered: undefined: the teacher is not ahead of the baseline"]
    defined = {"gap_recovered": 0.5, "gap_recovered_note": "the teacher leads the baseline by 300 of 10,000"}
    assert result_lines(defined) == ["gap recovered: 0.500 of the teacher's lead over the baseline (the teacher "
                                     "leads the baseline by 300 of 10,000)"]


def test_class_table_names_every_class():
    metrics = {"data": {"classes": ["cat", "dog"]},
               "teacher": {"class_accuracy": [1.0, 0.5]}, "student": {"class_accuracy": [0.75, None]}}
    assert class_table(metrics).splitlines() == [
        "| class | teacher | student distilled |", "| --- | --- | --- |",
        "| cat | 100.00 % | 75.00 % |", "| dog | 50.00 % | – |"]
    assert class_table({"teacher": {}}) is None
