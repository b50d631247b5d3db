"""A careless or hostile user at the command line: each test is one defect a reviewer found (issue 6).

Every outcome is a finished run or one line with exit code 2; nothing that is not kdistill's is
deleted; nothing stale is reused.
"""

import errno
import gzip
import json
import os
import struct
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from kdistill.cli import main

DIGITS = "recipes/digits_quick.yaml"
FAST = ["teacher.train.epochs=1", "train.epochs=1", "eval.latency_repeats=1", "threads=1"]
RUN = "digits_quick"


def cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()  # only this command's output
    code = main([*argv, "--quiet"])
    return code, capsys.readouterr().err.strip()


def refused(capsys, argv, expected: str) -> str:
    code, err = cli(capsys, *argv)
    assert code == 2, err
    assert err.startswith("kdistill: error: ") and len(err.splitlines()) == 1, err
    assert expected in err, err
    return err


@pytest.fixture
def finished(tmp_path, soft_label_cache):
    assert main(["run", DIGITS, f"out_dir={tmp_path}", *FAST, "--quiet"]) == 0
    return tmp_path / RUN


# -- 1. a recipe never runs code: tests/test_models_hostile.py ----------------------------

# -- 2. --force deletes only what kdistill made ----------------------------------------------

def test_force_never_clears_a_folder_kdistill_did_not_make(capsys, tmp_path):
    mine = tmp_path / RUN
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    refused(capsys, ["run", DIGITS, f"out_dir={tmp_path}", *FAST, "--force"], "not made by kdistill")
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_force_keeps_files_of_the_user_inside_a_run_folder(capsys, finished, tmp_path):
    (finished / "notes.txt").write_text("mine")
    (finished / "teacher" / "notes.txt").write_text("mine too")
    (finished / "mydata").mkdir()
    (finished / "mydata" / ".draft.notes123.tmp").write_text("named like a temporary, but not in our folders")
    assert main(["run", DIGITS, f"out_dir={tmp_path}", *FAST, "--force", "--quiet"]) == 0
    assert (finished / "notes.txt").read_text() == "mine"
    assert (finished / "teacher" / "notes.txt").read_text() == "mine too"
    assert (finished / "mydata" / ".draft.notes123.tmp").exists()


def test_a_partial_force_after_a_config_change_deletes_nothing(capsys, finished, tmp_path):
    models = {role: (finished / role / "model.safetensors").read_bytes() for role in ("teacher", "baseline")}
    refused(capsys, ["distill", DIGITS, f"out_dir={tmp_path}", *FAST, "teacher.train.lr=0.1", "--force"],
            "kdistill run ... --force")
    assert all((finished / role / "model.safetensors").read_bytes() == b for role, b in models.items())
    # A change the teacher and the baseline do not depend on: only the distilled student is redone.
    code, _ = cli(capsys, "distill", DIGITS, f"out_dir={tmp_path}", *FAST, "distill.temperature=8", "--force")
    assert code == 0
    assert all((finished / role / "model.safetensors").read_bytes() == b for role, b in models.items())


@pytest.mark.parametrize("link", [".lock", "teacher", "metrics.json", "student/metrics.jsonl"])
def test_kdistill_never_writes_through_a_symbolic_link(capsys, finished, tmp_path, link):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    target = precious if link == "teacher" else precious / "thesis.tex"
    planted = finished / link
    if planted.is_dir():
        import shutil
        shutil.rmtree(planted)
    else:
        planted.unlink(missing_ok=True)
    planted.symlink_to(target)
    refused(capsys, ["run", DIGITS, f"out_dir={tmp_path}", *FAST, "--force"], "symbolic link")
    assert (precious / "thesis.tex").read_text() == "years of work" and sorted(os.listdir(precious)) == ["thesis.tex"]


def test_force_never_deletes_the_teacher_checkpoint_it_is_given(capsys, finished, tmp_path):
    checkpoint = finished / "teacher" / "model.safetensors"
    before = checkpoint.read_bytes()
    refused(capsys, ["run", DIGITS, f"out_dir={tmp_path}", *FAST, f"teacher.checkpoint={checkpoint}", "--force"],
            "would delete teacher.checkpoint")
    assert checkpoint.read_bytes() == before


@pytest.mark.parametrize("command", ["eval", "report", "soft-labels", "check"])
def test_commands_that_do_not_train_take_no_force(capsys, finished, tmp_path, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, DIGITS, f"out_dir={tmp_path}", *FAST, "--force", "--quiet"])
    assert exit_.value.code == 2
    assert all((finished / role / "model.safetensors").exists() for role in ("teacher", "baseline", "student"))


def test_distill_force_retrains_the_student_only(capsys, finished, tmp_path):
    teacher = (finished / "teacher" / "model.safetensors").stat().st_mtime_ns
    baseline = (finished / "baseline" / "model.safetensors").stat().st_mtime_ns
    assert main(["distill", DIGITS, f"out_dir={tmp_path}", *FAST, "--force", "--quiet"]) == 0
    assert (finished / "teacher" / "model.safetensors").stat().st_mtime_ns == teacher
    assert (finished / "baseline" / "model.safetensors").stat().st_mtime_ns == baseline
    assert not (finished / "metrics.json").exists()  # stale once the student changed


# -- 4. a run folder knows what data it trained on; a resume knows its numerics --------------

def write_mnist_format(folder, seed: int, test_size: int = 28) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, size in (("train", 400, 28), ("t10k", 60, test_size)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, size, size))),
                            ("labels-idx1", rng.integers(0, 10, n))):
            header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            (folder / f"{split}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def mnist_recipe(tmp_path) -> str:
    """seed CNNs on MNIST-format files (the digits recipe's MLP kwargs would not fit them)."""
    recipe = tmp_path / "mnist.yaml"
    recipe.write_text("name: digits_quick\ndata: {name: mnist, val_size: 50, download: false}\n"
                      "teacher: {name: seed_student}\nstudent: {name: seed_student}\n")
    return str(recipe)


def test_other_data_at_data_root_is_not_evaluated_with_the_old_models(capsys, tmp_path, soft_label_cache):
    write_mnist_format(tmp_path / "a" / "mnist", seed=1)
    write_mnist_format(tmp_path / "b" / "mnist", seed=2)
    runs, recipe = tmp_path / "runs", mnist_recipe(tmp_path)
    assert main(["run", recipe, f"out_dir={runs}", *FAST, f"data.root={tmp_path / 'a'}", "--quiet"]) == 0
    for command in ("run", "eval"):
        refused(capsys, [command, recipe, f"out_dir={runs}", *FAST, f"data.root={tmp_path / 'b'}"],
                "not the data this run trained on")
    # The same data elsewhere is the same data.
    (tmp_path / "a").rename(tmp_path / "c")
    assert main(["eval", recipe, f"out_dir={runs}", *FAST, f"data.root={tmp_path / 'c'}", "--quiet"]) == 0


def test_test_images_of_another_size_are_refused_before_training(capsys, tmp_path):
    write_mnist_format(tmp_path / "data" / "mnist", seed=1, test_size=14)
    refused(capsys, ["run", mnist_recipe(tmp_path), f"out_dir={tmp_path / 'runs'}", *FAST,
                     f"data.root={tmp_path / 'data'}"], "14")
    assert not any((tmp_path / "runs").rglob("*.safetensors"))


def test_a_resume_with_other_threads_is_refused(capsys, tmp_path, soft_label_cache, monkeypatch):
    from kdistill.train import loop

    calls = {"n": 0}
    real_save = loop._save_state

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # after the first epoch's state is on disk

    monkeypatch.setattr(loop, "_save_state", save_then_die)
    args = ["train", DIGITS, f"out_dir={tmp_path}", "teacher.train.epochs=3"]
    assert main([*args, "threads=1", "--quiet"]) == 130
    refused(capsys, [*args, "threads=2", "--resume"], "set threads=1")
    assert main([*args, "threads=1", "--resume", "--quiet"]) == 0


def test_a_resumed_distillation_refuses_another_teacher(capsys, tmp_path, soft_label_cache, monkeypatch):
    from kdistill.train import loop

    assert main(["train", DIGITS, f"out_dir={tmp_path / 'a'}", *FAST, "--quiet"]) == 0
    assert main(["train", DIGITS, f"out_dir={tmp_path / 'b'}", *FAST, "seed=1", "--quiet"]) == 0
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes((tmp_path / "a" / RUN / "teacher" / "model.safetensors").read_bytes())
    args = ["distill", DIGITS, f"out_dir={tmp_path / 'runs'}", *FAST, "train.epochs=3", f"teacher.checkpoint={teacher}"]
    real_save, calls = loop._save_state, []

    def save_then_die(*a, **k):
        real_save(*a, **k)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save_state", save_then_die)
    assert main([*args, "--quiet"]) == 130
    monkeypatch.setattr(loop, "_save_state", real_save)
    teacher.write_bytes((tmp_path / "b" / RUN / "teacher" / "model.safetensors").read_bytes())  # another teacher
    refused(capsys, [*args, "--resume"], "changed: teacher")


def test_report_refuses_metrics_of_a_teacher_that_changed(capsys, finished, tmp_path, soft_label_cache):
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes((finished / "teacher" / "model.safetensors").read_bytes())
    args = [DIGITS, f"out_dir={tmp_path / 'runs'}", *FAST, f"teacher.checkpoint={teacher}"]
    assert main(["run", *args, "--quiet"]) == 0
    assert main(["train", DIGITS, f"out_dir={tmp_path / 'other'}", *FAST, "seed=3", "--quiet"]) == 0
    teacher.write_bytes((tmp_path / "other" / RUN / "teacher" / "model.safetensors").read_bytes())
    refused(capsys, ["report", *args], "have changed since")


def test_check_writes_nothing_and_reaches_the_verdict_of_run(capsys, finished, tmp_path):
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    refused(capsys, ["check", DIGITS, f"out_dir={tmp_path}", *FAST, "teacher.train.lr=0.1"], "another config")
    code, _ = cli(capsys, "check", DIGITS, f"out_dir={tmp_path}", *FAST, f"distill.cache_dir={finished / 'cache'}")
    assert code == 0
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_cache_inside_the_run_folder(capsys, tmp_path):
    run = tmp_path / RUN
    assert main(["run", DIGITS, f"out_dir={tmp_path}", *FAST, f"distill.cache_dir={run / 'cache'}", "--quiet"]) == 0
    assert list((run / "cache").glob("*.safetensors"))


# -- 5. one process per run folder -----------------------------------------------------------

def test_a_second_run_on_a_busy_folder_names_the_holder(capsys, tmp_path, soft_label_cache):
    from kdistill.config import load_config
    from kdistill.pipeline import Pipeline

    with Pipeline(load_config(DIGITS, [f"out_dir={tmp_path}", *FAST]), progress="quiet"):
        refused(capsys, ["run", DIGITS, f"out_dir={tmp_path}", *FAST], f"PID {os.getpid()}")
    assert main(["run", DIGITS, f"out_dir={tmp_path}", *FAST, "--quiet"]) == 0  # free again


# -- 9. paths and files are checked before the first epoch -----------------------------------

def test_a_file_as_out_dir(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    refused(capsys, ["run", DIGITS, f"out_dir={tmp_path / 'file'}", *FAST], "is a file")


def test_a_file_as_cache_dir_fails_before_any_training(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    refused(capsys, ["run", DIGITS, f"out_dir={tmp_path / 'runs'}", *FAST, f"distill.cache_dir={tmp_path / 'file'}"],
            "distill.cache_dir")
    assert not any(tmp_path.rglob("*.safetensors"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_dir(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    refused(capsys, ["run", DIGITS, f"out_dir={locked}", *FAST], str(locked))


def test_a_full_disk_is_one_line(capsys, tmp_path, soft_label_cache, monkeypatch):
    from kdistill.train import checkpoint

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x"))

    monkeypatch.setattr(checkpoint, "save_file", no_space)
    refused(capsys, ["run", DIGITS, f"out_dir={tmp_path}", *FAST], "No space left on device")


def test_a_user_model_whose_forward_fails(capsys, tmp_path, monkeypatch):
    (tmp_path / "broken_net.py").write_text(
        "import torch.nn as nn\n"
        "class Broken(nn.Module):\n"
        "    def __init__(self, hidden=()):\n"
        "        super().__init__()\n"
        "    def forward(self, x):\n"
        "        raise IndexError('my bug')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    refused(capsys, ["run", DIGITS, f"out_dir={tmp_path / 'runs'}", *FAST, "student.name=broken_net:Broken"], "my bug")


def write_module(tmp_path, monkeypatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_user_model_failing_on_a_real_batch_is_one_line(capsys, tmp_path, monkeypatch, soft_label_cache):
    write_module(tmp_path, monkeypatch, "bn_net", (
        "import torch.nn as nn\n"
        "class BNNet(nn.Sequential):\n"
        "    def __init__(self, hidden=()):\n"
        "        super().__init__(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))\n"))
    # 1200 training images in batches of 1199: the last batch holds one image, which BatchNorm cannot train on.
    refused(capsys, ["run", DIGITS, f"out_dir={tmp_path / 'runs'}", *FAST, "student.name=bn_net:BNNet",
                     "train.batch_size=1199"], "the student (BNNet) failed on a training batch of shape (1, 1, 8, 8)")


@pytest.mark.parametrize("forward, expected", [
    ("return x.flatten(1)[:, :10] * 0 + self.w.detach()", "do not depend on its parameters"),
    ("return x.flatten(1)[:, :10]", "no trainable parameters"),
])
def test_an_untrainable_model_is_refused_before_any_training(capsys, tmp_path, monkeypatch, forward, expected):
    module = f"untrainable_{len(forward)}"  # one module per case: Python keeps imported modules
    write_module(tmp_path, monkeypatch, module, (
        "import torch\nimport torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, hidden=()):\n"
        "        super().__init__()\n"
        f"        {'self.w = nn.Parameter(torch.zeros(10))' if 'self.w' in forward else 'pass'}\n"
        "    def forward(self, x):\n"
        f"        {forward}\n"))
    refused(capsys, ["run", DIGITS, f"out_dir={tmp_path / 'runs'}", *FAST, f"student.name={module}:Net"], expected)
    assert not any((tmp_path / "runs").rglob("*.safetensors"))


def test_a_resume_state_that_does_not_fit_the_model_is_one_line(capsys, finished, tmp_path):
    state = finished / "baseline" / "train_state.safetensors"
    state.write_bytes((finished / "teacher" / "model.safetensors").read_bytes())  # some other safetensors file
    (finished / "baseline" / "model.safetensors").unlink()
    refused(capsys, ["train", DIGITS, f"out_dir={tmp_path}", *FAST, "--baseline", "--resume"],
            "is not a kdistill training state")


def test_a_teacher_checkpoint_holding_nan_is_refused_on_load(capsys, finished, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(finished / "teacher" / "model.safetensors")
    next(iter(weights.values()))[0] = float("nan")
    save_file(weights, tmp_path / "nan.safetensors")
    refused(capsys, ["run", DIGITS, f"out_dir={tmp_path / 'runs'}", *FAST,
                     f"teacher.checkpoint={tmp_path / 'nan.safetensors'}"], "NaN or inf")
    assert not any((tmp_path / "runs").rglob("model.safetensors"))


@pytest.mark.parametrize("name, content", [
    ("student/summary.json", '{"median_epoch_seconds": "x"}'),
    ("teacher/summary.json", '{"train_seconds": {"a": 1}}'),
    ("metrics.json", "{not json"),
    ("metrics.json", "[1, 2]"),
    ("metrics.json", '{"teacher": 3}'),
    ("teacher/summary.json", "\x00\x01"),
    ("config.yaml", "a: [unclosed"),
    (".kdistill-run.json", "garbage"),
])
def test_corrupt_files_in_a_run_folder(capsys, finished, tmp_path, name, content):
    (finished / name).write_text(content)
    code, err = cli(capsys, "report" if name == "metrics.json" else "eval", DIGITS, f"out_dir={tmp_path}", *FAST)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("kdistill: error:"), err


def test_unexpected_errors_are_one_line_too(capsys, tmp_path, monkeypatch):
    from kdistill import pipeline

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr(pipeline.Pipeline, "run", bug)
    code, err = cli(capsys, "run", DIGITS, f"out_dir={tmp_path}", *FAST)
    assert code == 1 and err == "kdistill: unexpected ZeroDivisionError: a bug of ours (set KDISTILL_TRACEBACK=1 " \
                                "to see where)"


# -- 10. a corrupt soft-label cache entry is rebuilt -----------------------------------------

def test_a_corrupt_cache_entry_is_rebuilt(capsys, finished, tmp_path, soft_label_cache):
    (entry,) = soft_label_cache.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])
    code = main(["run", DIGITS, f"out_dir={tmp_path}", *FAST, "name=again"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "rebuil" in err.lower(), err


# -- 11. honest numbers ----------------------------------------------------------------------

def test_gap_recovered_needs_a_lead_beyond_the_noise():
    from kdistill.evaluation import gap_recovered

    n = 10_000
    baseline = torch.zeros(n, dtype=torch.bool)
    baseline[:8900] = True
    teacher = baseline.clone()
    teacher[8900:8906] = True  # 6 images better...
    teacher[:500] = ~teacher[:500]  # ... and 500 right/wrong swaps each way: a lead of 6 is noise here
    teacher[8906:9406] = True
    student = baseline.clone()
    student[8900:9000] = True
    gap, note = gap_recovered(teacher, baseline, student)
    assert gap is None and "within the noise" in note and "6 of 10,000" in note

    teacher = baseline.clone()
    teacher[8900:9300] = True  # 400 images better, no swaps
    gap, note = gap_recovered(teacher, baseline, student)
    assert gap == pytest.approx(100 / 400)


def test_latency_is_measured_in_interleaved_rounds():
    from kdistill.evaluation import latency_ms

    calls = []

    class Recorder(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            calls.append(self.name)
            return x

    models = {"a": Recorder("a"), "b": Recorder("b"), "c": Recorder("c")}
    result = latency_ms(models, (1, 2, 2), [1], repeats=6)
    assert set(result.median) == {"a", "b", "c"} and all(r["batch_1"] > 0 for r in result.median.values())
    assert all(r["batch_1"] >= 0 for r in result.spread.values())
    # Each measurement is Timer.timeit(1): two warm-up calls, then the timed one.
    timed = calls[-54:][2::3]  # after the first warm-up: rounds of three, each model in every position
    assert [sorted(timed[i:i + 3]) for i in range(0, 18, 3)] == [["a", "b", "c"]] * 6
    assert {timed[i] for i in range(0, 18, 3)} == {"a", "b", "c"}


# -- 12. config surprises seen by the pipeline -----------------------------------------------

def test_crop_padding_larger_than_the_image(capsys, tmp_path):
    refused(capsys, ["run", DIGITS, f"out_dir={tmp_path}", *FAST, "train.augment.crop_padding=9"],
            "train.augment.crop_padding=9 is too large for 8x8")


# -- 13. the Python API ----------------------------------------------------------------------

def toy_loader(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def small(width=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 2))


@pytest.mark.parametrize("option", ["batch_size", "augment", "label_smoothing"])
def test_fit_refuses_options_that_do_not_apply_to_a_users_loader(option):
    from kdistill import Distiller, KdistillError

    with pytest.raises(KdistillError, match=option):
        Distiller(None, small(), losses={"ce": {}}).fit(toy_loader(), epochs=1, progress="quiet", **{option: 0})


def test_fit_resumes_and_labels_its_lines(tmp_path, capsys):
    from kdistill import Distiller

    torch.manual_seed(0)
    full = small()
    torch.manual_seed(0)
    cut = small()
    Distiller(None, full, losses={"ce": {}}).fit(toy_loader(), epochs=3, lr=0.01, out_dir=tmp_path / "full",
                                                 progress="lines", label="mine")
    assert "[mine] epoch 3/3" in capsys.readouterr().err
    Distiller(None, cut, losses={"ce": {}}).fit(toy_loader(), epochs=2, lr=0.01, out_dir=tmp_path / "cut",
                                                progress="quiet")
    # The same run, asked for 3 epochs, resumed after its second.
    torch.manual_seed(0)
    resumed = small()
    Distiller(None, resumed, losses={"ce": {}}).fit(toy_loader(), epochs=3, lr=0.01, out_dir=tmp_path / "cut",
                                                    resume=True, progress="quiet")
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:the teacher gets")  # an untrained teacher, on purpose
def test_a_distiller_built_before_its_teacher_is_trained():
    from kdistill import Distiller

    teacher, student = small(16), small()
    later = Distiller(teacher, student, losses={"kd": {}})  # the teacher is not frozen by this
    Distiller(None, teacher, losses={"ce": {}}).fit(toy_loader(), epochs=2, lr=0.05, progress="quiet")
    later.fit(toy_loader(), epochs=1, progress="quiet")


def test_fit_refuses_settings_it_would_ignore(tmp_path):
    from kdistill import Distiller, KdistillError
    from kdistill.losses import build_objective

    with pytest.raises(KdistillError, match="early_stop_patience needs a val_loader"):
        Distiller(None, small(), losses={"ce": {}}).fit(toy_loader(), epochs=2, early_stop_patience=1, progress="quiet")
    with pytest.raises(KdistillError, match="temperature applies to losses given as a mapping"):
        Distiller(small(), small(), build_objective({"kd": {}}), temperature=2.0)
    Distiller(None, small(), losses={"ce": {}}).fit(toy_loader(), epochs=1, out_dir=tmp_path, progress="quiet")
    with pytest.raises(KdistillError, match="train.optimizer"):  # resumed under another optimizer
        Distiller(None, small(), losses={"ce": {}}).fit(toy_loader(), epochs=2, out_dir=tmp_path, resume=True,
                                                        optimizer="sgd", progress="quiet")


@pytest.mark.filterwarnings("ignore:the teacher gets")  # an untrained teacher, on purpose
def test_the_users_teacher_is_given_back_as_it_was():
    from kdistill import Distiller

    teacher = small(16)
    teacher.train()
    teacher[1].weight.requires_grad_(False)  # the user's own choice, kept
    Distiller(teacher, small(), losses={"kd": {}}).fit(toy_loader(), epochs=1, progress="quiet")
    assert teacher.training and all(m.training for m in teacher.modules())
    assert not teacher[1].weight.requires_grad and teacher[1].bias.requires_grad and teacher[4].weight.requires_grad


def test_an_untrained_teacher_is_a_warning(recwarn):
    from kdistill import Distiller

    class Constant(nn.Module):  # always answers class 1, whatever the input: chance level or worse
        def forward(self, x):
            return torch.tensor([[0.0, 5.0]], device=x.device).expand(x.shape[0], 2)

    loader = [(x, torch.zeros_like(y)) for x, y in toy_loader()]  # every label is 0
    Distiller(Constant(), small(), losses={"kd": {}}).fit(loader, epochs=1, progress="quiet")
    assert any("no better than chance" in str(w.message) for w in recwarn.list)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trained teacher: not a word
        good = [(x, y) for x, y in toy_loader()]

        class Oracle(nn.Module):
            def forward(self, x):
                positive = (x.mean((1, 2, 3)) > 0).float()
                return torch.stack([1 - positive, positive], 1) * 5

        Distiller(Oracle(), small(), losses={"kd": {}}).fit(good, epochs=1, progress="quiet")


# -- 14. housekeeping ------------------------------------------------------------------------

def test_stale_temporaries_of_a_killed_write_are_cleaned(finished, tmp_path):
    stale = [finished / ".config.yaml.x1y2z3w4.tmp", finished / "student" / ".model.safetensors.abc123de.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    (finished / "keep.tmp").write_text("not our pattern")
    assert main(["eval", DIGITS, f"out_dir={tmp_path}", *FAST, "--quiet"]) == 0
    assert not any(path.exists() for path in stale)
    assert (finished / "keep.tmp").exists()


def test_a_run_folder_is_readable_by_others(finished):
    umask = os.umask(0)
    os.umask(umask)
    for path in (finished / "config.yaml", finished / "metrics.json", finished / "teacher" / "model.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_metrics_report_no_gap_for_a_teacher_within_noise(finished):
    metrics = json.loads((finished / "metrics.json").read_text())
    assert ("gap_recovered" in metrics) and ("gap_recovered_note" in metrics)
    if metrics["gap_recovered"] is None:
        assert "undefined" in metrics["gap_recovered_note"]


# -- a third look (second review of this hardening) -----------------------------------------

def test_a_resumed_distillation_refuses_a_teacher_whose_code_changed(capsys, tmp_path, monkeypatch,
                                                                     soft_label_cache):
    from kdistill.train import loop

    write_module(tmp_path, monkeypatch, "scaled_teacher", (
        "import torch.nn as nn\nSCALE = 1.0\n"
        "class Teach(nn.Module):\n"
        "    def __init__(self, hidden=()):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(64, 10)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x.flatten(1)) * SCALE\n"))
    args = ["distill", DIGITS, f"out_dir={tmp_path / 'runs'}", *FAST, "train.epochs=3",
            "teacher.name=scaled_teacher:Teach"]
    assert main(["train", *args[1:], "--quiet"]) == 0
    real_save = loop._save_state

    def save_then_die(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save_state", save_then_die)
    assert main([*args, "--quiet"]) == 130
    monkeypatch.setattr(loop, "_save_state", real_save)
    import scaled_teacher
    monkeypatch.setattr(scaled_teacher, "SCALE", 3.0)  # same weights, same config, other outputs
    refused(capsys, [*args, "--resume"], "changed: teacher")


def test_the_run_folder_itself_as_a_link_is_refused(capsys, finished, tmp_path):
    elsewhere = tmp_path / "links"
    elsewhere.mkdir()
    (elsewhere / RUN).symlink_to(finished)
    before = (finished / "teacher" / "model.safetensors").read_bytes()
    refused(capsys, ["run", DIGITS, f"out_dir={elsewhere}", *FAST, "--force"], "symbolic link")
    assert (finished / "teacher" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("edit, command, expected", [
    (lambda run: (run / "config.yaml").write_text("seed: ${nope}\n"), "report", "config.yaml is unreadable"),
    (lambda run: (run / "config.yaml").unlink(), "run", "config.yaml is missing"),
    (lambda run: (run / "student" / "metrics.jsonl").write_text('{not json\n'), "report", "metrics.jsonl line 1"),
    (lambda run: (run / "teacher" / "metrics.jsonl").write_text('{"epoch": 1}\n'), "report", "metrics.jsonl line 1"),
    (lambda run: (run / "metrics.json").write_text(
        (run / "metrics.json").read_text().replace('"latency_device": "cpu"', '"latency_device": 5')),
     "report", "not kdistill's metrics file"),
])
def test_hand_edited_run_files_are_one_line(capsys, finished, tmp_path, edit, command, expected):
    edit(finished)
    refused(capsys, [command, DIGITS, f"out_dir={tmp_path}", *FAST], expected)


def test_a_broken_config_yaml_does_not_lock_the_user_out(capsys, finished, tmp_path):
    (finished / "config.yaml").write_text("seed: ${nope}\n")
    assert main(["run", DIGITS, f"out_dir={tmp_path}", *FAST, "--force", "--quiet"]) == 0


@pytest.mark.parametrize("key, value", [("numerics", "notjson"), ("numerics", '{"torch": "1.0"}'),
                                        ("started_from", "[1, 2]"), ("result", "[1]"), ("result", '{"history": 5}')])
def test_a_hand_edited_training_state_is_one_line(capsys, tmp_path, soft_label_cache, monkeypatch, key, value):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from kdistill.train import loop

    real_save = loop._save_state

    def save_then_die(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save_state", save_then_die)
    args = ["train", DIGITS, f"out_dir={tmp_path}", *FAST, "teacher.train.epochs=3"]
    assert main([*args, "--quiet"]) == 130
    monkeypatch.setattr(loop, "_save_state", real_save)
    state = tmp_path / RUN / "teacher" / "train_state.safetensors"
    with safe_open(state, "pt") as handle:
        tensors, meta = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
    save_file(tensors, state, metadata={**meta, key: value})
    refused(capsys, [*args, "--resume"], "train_state.safetensors")


def test_check_refuses_what_run_refuses(capsys, finished, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text("not a checkpoint")
    student = finished / "student" / "model.safetensors"
    for checkpoint, expected in ((garbage, "not a readable safetensors file"), (student, "does not fit")):
        refused(capsys, ["check", DIGITS, f"out_dir={tmp_path / 'other'}", *FAST, f"teacher.checkpoint={checkpoint}"],
                expected)
    (finished / "student" / "train_state.safetensors").write_bytes(b"interrupted")
    (finished / "student" / "model.safetensors").unlink()
    refused(capsys, ["check", DIGITS, f"out_dir={tmp_path}", *FAST], "pass --resume")
    import shutil
    shutil.rmtree(finished / "baseline")
    (finished / "baseline").write_text("my notes")
    refused(capsys, ["check", DIGITS, f"out_dir={tmp_path}", *FAST], "is a file")


def test_the_python_api_resumes_only_with_the_same_teacher(tmp_path):
    from kdistill import Distiller, KdistillError

    teacher_a, teacher_b = small(16), small(16)
    losses = {"ce": {}, "kd": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained teachers, on purpose
        Distiller(teacher_a, small(), losses).fit(toy_loader(), epochs=1, out_dir=tmp_path, progress="quiet")
        with pytest.raises(KdistillError, match="changed: teacher"):
            Distiller(teacher_b, small(), losses).fit(toy_loader(), epochs=2, out_dir=tmp_path, resume=True,
                                                      progress="quiet")
        Distiller(teacher_a, small(), losses).fit(toy_loader(), epochs=2, out_dir=tmp_path, resume=True,
                                                  progress="quiet")
