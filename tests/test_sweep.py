"""`kdistill sweep`: the grid is checked before anything runs, work is shared, finished cells are skipped."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdistill.cli import main
from kdistill.errors import KdistillError
from kdistill.sweep import Sweep, parse_axes, parse_seeds, split_values

FAST = ["teacher.train.epochs=2", "train.epochs=2", "eval.latency_repeats=2", "eval.latency_batches=[1]"]


def sweep_cli(tmp_path, *args):
    return main(["sweep", "digits_quick", f"out_dir={tmp_path / 'runs'}", *FAST, *args])


def test_values_split_on_top_level_commas_only():
    assert split_values("1,2.5,x") == ["1", "2.5", "x"]
    assert split_values("[0.35, 1],[0.5,1]") == ["[0.35, 1]", "[0.5,1]"]
    assert split_values("{a: 1, b: 2},'x,y'") == ["{a: 1, b: 2}", "'x,y'"]
    assert parse_axes(["distill.temperature=1,4", "seed=3"]) == [("distill.temperature", ["1", "4"]),
                                                                  ("seed", ["3"])]


@pytest.mark.parametrize(("items", "message"), [
    (["distill.temprature=1,4"], "distill.temprature"),  # no such key
    (["distill.temperature=1,[4"], "cannot parse"),  # a value that does not parse
    (["distill.temperature=1,-4"], "distill.temperature"),  # out of range, in the second cell
    (["distill.temperature=1,,4"], "empty value"),
    (["distill.temperature"], "not key=v1,v2"),
    (["distill.temperature=1,4", "distill.temperature=2,8"], "given twice"),
    (["teacher.checkpoint=t/a.safetensors,t_a.safetensors"], "would share the run folder"),  # would overwrite
    (["distill.temperature=4,4"], "would share the run folder"),
    (["seed=1,2"], "use --seeds"),
    (["name=x"], "use --name"),
])
def test_a_bad_grid_is_refused_before_anything_runs(tmp_path, capsys, items, message):
    assert sweep_cli(tmp_path, *items) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("text", "message"), [("0,x", "integers"), ("1,1", "distinct"), ("-1", "non-negative")])
def test_bad_seeds(text, message):
    with pytest.raises(KdistillError, match=message):
        parse_seeds(text)


def test_bad_jobs(tmp_path, capsys):
    assert sweep_cli(tmp_path, "distill.temperature=1,4", "--jobs", "0") == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err


def test_a_sweep_shares_the_teacher_and_the_baseline_and_resumes(tmp_path, soft_label_cache, capsys):
    assert sweep_cli(tmp_path, "distill.temperature=2,8", "--seeds", "0,1", "--jobs", "2") == 0
    out = capsys.readouterr().out
    folder = tmp_path / "runs" / "digits_quick_sweep"
    cells = [f"distill.temperature={t},seed={s}" for t in (2, 8) for s in (0, 1)]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("distill.")) == sorted(cells)
    assert "[4/4]" in out and "about" in out and "results:" in out
    # One teacher for the whole sweep, given to every cell as its checkpoint; its soft labels cached once.
    (teacher,) = (folder.parent / "teachers").glob("teacher-*")
    assert len(list(soft_label_cache.glob("*.safetensors"))) == 1
    # ... by one step with every thread before the cells, which then load it.
    (signal_log,) = (folder / "logs").glob("*.soft-labels.log")
    assert "built:" in signal_log.read_text() and "teacher signal " in out
    assert all("soft labels (each sample) loaded" in (folder / "logs" / f"{cell}.run.log").read_text()
               for cell in cells)
    for cell in cells:
        config = (folder / cell / "config.yaml").read_text()
        assert str(teacher / "teacher" / "model.safetensors") in config
    # One baseline per seed, trained once and shared by both temperatures.
    trained = sorted(p.name for p in (folder / "logs").glob("*.train.log"))
    assert trained == sorted([f"{teacher.name}.train.log", *(f"{cell}.train.log" for cell in cells[:2])])
    for seed in (0, 1):
        first, shared = (folder / f"distill.temperature={t},seed={seed}" / "baseline" / "model.safetensors"
                         for t in (2, 8))
        assert first.read_bytes() == shared.read_bytes()
    with open(folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["distill.temperature"] for r in rows] == ["2", "8"] and all(r["seeds"] == "2" for r in rows)
    per_seed = [json.loads((folder / f"distill.temperature=2,seed={s}" / "metrics.json").read_text())
                ["student"]["test_accuracy"] for s in (0, 1)]
    assert float(rows[0]["student.test_accuracy_mean"]) == pytest.approx(sum(per_seed) / 2)
    assert float(rows[0]["student.median_epoch_seconds_mean"]) > 0 and rows[0]["teacher_signal"] == "cached"
    results = (folder / "results.md").read_text()
    assert "Best by validation accuracy" in results and "| student s / epoch |" in results
    assert results.count("| cached |") == 2  # the teacher signal, one per grid point

    # A killed sweep: one cell lost its result. Running the same command again redoes only that cell.
    (folder / cells[3] / "metrics.json").unlink()
    assert sweep_cli(tmp_path, "distill.temperature=2,8", "--seeds", "0,1") == 0
    out = capsys.readouterr().out
    assert "3 of 4 cells already done, skipped" in out and "[1/1] " + cells[3] in out

    # A grown grid: the new temperature's cells take the baselines the finished cells have.
    assert sweep_cli(tmp_path, "distill.temperature=2,8,4", "--seeds", "0,1") == 0
    assert not list((folder / "logs").glob("distill.temperature=4,*.train.log"))
    for seed in (0, 1):
        assert (folder / f"distill.temperature=4,seed={seed}" / "baseline" / "model.safetensors").read_bytes() == \
            (folder / f"distill.temperature=2,seed={seed}" / "baseline" / "model.safetensors").read_bytes()


def test_a_grid_over_teachers_trains_one_teacher_each(tmp_path, soft_label_cache):
    sweep = Sweep("digits_quick", ["teacher.kwargs.hidden=[32],[64]", "distill.temperature=2,4"], [0])
    keys = {sweep.teacher_key(cell) for cell in sweep.cells}
    baselines = {sweep.baseline_key(cell) for cell in sweep.cells}
    assert len(sweep.cells) == 4 and len(keys) == 2 and len(baselines) == 1


def test_cells_share_a_cached_teacher_signal_only_where_it_is_the_same():
    sweep = Sweep("digits_quick", ["distill.losses={kd: {}},{kd: {weight: 0.5}, ce: {}},{ce: {}},"
                                   "{ce: {}, sp: {student: body.fc1, teacher: body.fc1}},"
                                   "{ce: {}, sp: {student: body.fc1, teacher: body.fc1@input}}"], [0, 1])
    keys = [sweep.signal_key(cell) for cell in sweep.cells]
    assert keys[0] == keys[1] == keys[2] == keys[3] and keys[4] is keys[5] is None  # CE reads no teacher
    assert len({keys[0], keys[6], keys[8]}) == 3  # a tapped module has its own features
    views = Sweep("digits_quick", ["train.augment.hflip=true", "distill.teacher_signal=cached_views",
                                   "distill.views=2,4"], [0])
    live = Sweep("digits_quick", ["train.augment.hflip=true", "distill.teacher_signal=live"], [0])
    assert len({views.signal_key(c) for c in views.cells} | {keys[0]}) == 3
    assert live.signal_key(live.cells[0]) is None


def test_the_study_sweeps_share_one_residual_teacher():
    # make study's sweeps (Makefile): every value parses, and the residual teacher is one for all three.
    objectives = Sweep("study_fashion_mnist", ["teacher.name=resnet,mlp", "distill.losses={kd: {weight: 1}},"
                       "{kd: {weight: 0.9}, ce: {weight: 0.1}},{logit_mse: {weight: 1}},{tang: {weight: 1}}"],
                       [0, 1, 2], name="study_objectives")
    temperature = Sweep("study_fashion_mnist", ["distill.temperature=1,2,4,5,8,10,20"], [0, 1, 2])
    augmentation = Sweep("study_fashion_mnist", ["train.augment.crop_padding=2", "train.augment.hflip=true",
                                                 "distill.teacher_signal=cached_views"], [0, 1, 2])
    assert [len(s.cells) for s in (objectives, temperature, augmentation)] == [24, 21, 3]
    residual = {s.teacher_key(c) for s in (temperature, augmentation) for c in s.cells}
    assert len(residual) == 1 and residual < {objectives.teacher_key(c) for c in objectives.cells}
    assert objectives.cells[0].cfg.distill.losses == {"kd": {"weight": 1}}  # the recipe's ce is replaced
    mlp = next(c for c in objectives.cells if c.cfg.teacher.name == "mlp")
    assert mlp.cfg.teacher.kwargs == {}  # the resnet's kwargs are not given to the mlp


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="the parent-death signal is Linux's")
def test_a_killed_sweep_stops_its_cells(tmp_path, soft_label_cache):
    """SIGKILL to the sweep: the cell it was running is stopped too (it would resume), not left running unseen."""
    env = {**os.environ, "KDISTILL_CACHE_DIR": str(soft_label_cache)}
    sweep = subprocess.Popen([sys.executable, "-m", "kdistill", "sweep", "digits_quick", f"out_dir={tmp_path}",
                              "teacher.train.epochs=500", "distill.temperature=2,4"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def cells() -> list[int]:  # processes started by the sweep: their command line names its folder
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                command = (Path("/proc") / pid / "cmdline").read_bytes()
            except OSError:
                continue
            if int(pid) != sweep.pid and str(tmp_path).encode() in command:
                found.append(int(pid))
        return found

    try:
        deadline = time.monotonic() + 60
        while not cells() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cells(), "the sweep started no cell"
        sweep.send_signal(signal.SIGKILL)
        sweep.wait()
        deadline = time.monotonic() + 20
        while cells() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not cells()
    finally:  # nothing left behind, whatever failed
        for pid in [sweep.pid, *cells()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        sweep.wait()
