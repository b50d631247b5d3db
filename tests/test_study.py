"""`kdistill report PATH...`: runs grouped by setting (mean and sd over seeds), axes found, plots written."""

import json

import pytest
import yaml
from PIL import Image

from kdistill.cli import main
from kdistill.errors import KdistillError
from kdistill.study import _frontier, find_runs, group, write_study


def fake_run(folder, temperature, seed, student_test, *, epochs=3):
    """A finished run folder as kdistill writes it, with chosen figures."""
    (folder / "student").mkdir(parents=True)
    (folder / "baseline").mkdir()
    config = {"name": folder.name, "seed": seed, "threads": 1, "out_dir": str(folder.parent),
              "distill": {"temperature": temperature, "losses": {"kd": {"weight": 1.0}}},
              "student": {"name": "mlp"}, "eval": {"latency_repeats": 3}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    model = {"params": 1000, "latency_ms": {"batch_1": 0.05}}
    metrics = {"teacher": {"model": "resnet", "test_accuracy": 0.95, "val_accuracy": 0.95, "params": 50_000,
                           "latency_ms": {"batch_1": 1.0}},
               "baseline": {"model": "mlp", "test_accuracy": 0.80, "val_accuracy": 0.81, **model},
               "student": {"model": "mlp", "test_accuracy": student_test, "val_accuracy": student_test + 0.01,
                           **model},
               "gap_recovered": (student_test - 0.80) / 0.15}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    for role in ("baseline", "student"):
        lines = [json.dumps({"epoch": e, "train_loss": 1.0 / e, "val_accuracy": 0.5 + 0.1 * e + 0.01 * seed,
                             "lr": 0.1, "epoch_seconds": 1.0, "samples_per_second": 100.0})
                 for e in range(1, epochs + 1)]
        (folder / role / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture
def sweep_folder(tmp_path):
    folder = tmp_path / "sweep"
    figures = {(1, 0): 0.82, (1, 1): 0.84, (4, 0): 0.86, (4, 1): 0.90, (8, 0): 0.85}
    for (t, seed), acc in figures.items():
        fake_run(folder / f"distill.temperature={t},seed={seed}", float(t), seed, acc)
    (folder / "teacher-abc" / "teacher").mkdir(parents=True)  # a teacher-only folder: not a run
    return folder


def test_runs_equal_but_for_the_seed_are_one_setting(sweep_folder):
    settings, axes = group(find_runs([sweep_folder]))
    assert axes == ["distill.temperature"]
    by_label = {s.label: s for s in settings}
    assert sorted(by_label) == ["temperature=1.0", "temperature=4.0", "temperature=8.0"]
    t4 = by_label["temperature=4.0"]
    assert len(t4.runs) == 2 and t4.mean("student.test_accuracy") == pytest.approx(0.88)
    assert t4.sd("student.test_accuracy") == pytest.approx(0.02 * 2 ** 0.5)
    assert by_label["temperature=8.0"].sd("student.test_accuracy") is None  # one seed: no spread


def test_the_report_has_a_table_and_readable_plots(sweep_folder, tmp_path):
    path = write_study([sweep_folder], tmp_path / "report")
    text = path.read_text()
    assert "5 runs in 3 settings" in text and "Best by validation accuracy: **temperature=4.0**" in text
    assert "| temperature=4.0 | 2 | 95.00 ± 0.00 % | 80.00 ± 0.00 % | 89.00 ± 2.83 % | 88.00 ± 2.83 % |" \
        in text
    for name in ("accuracy_vs_distill_temperature.png", "accuracy_vs_size_and_latency.png", "curves.png"):
        assert f"]({name})" in text
        with Image.open(tmp_path / "report" / name) as image:
            assert image.format == "PNG" and image.size[0] > 500


def test_the_cli_reports_on_folders(sweep_folder, tmp_path, capsys):
    assert main(["report", str(sweep_folder / "distill.temperature=1,seed=0"), str(sweep_folder),
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert "report: " in capsys.readouterr().out
    assert "5 runs in 3 settings" in (tmp_path / "out" / "report.md").read_text()  # the run given twice: once


def test_a_folder_without_runs_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "holds no finished kdistill runs" in err and err.count("\n") == 1
    with pytest.raises(KdistillError, match="not a folder"):
        find_runs([tmp_path / "nothing"])


def test_the_frontier_keeps_what_nothing_beats():
    points = [(1.0, 80.0), (2.0, 79.0), (2.0, 85.0), (5.0, 84.0), (9.0, 95.0)]
    assert _frontier(points) == [(1.0, 80.0), (2.0, 85.0), (9.0, 95.0)]
