"""End to end on scikit-learn's digits (offline, seconds): `kdistill run` and its steps."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from kdistill.cli import main

ROLES = ("teacher", "baseline", "student")
FAST = ["teacher.train.epochs=3", "train.epochs=3", "eval.latency_repeats=2"]


def run_cli(tmp_path, *args, recipe="recipes/digits_quick.yaml"):
    return main([args[0], recipe, f"out_dir={tmp_path / 'runs'}", *FAST, *args[1:]])


@pytest.fixture
def finished_run(tmp_path, soft_label_cache):
    assert run_cli(tmp_path, "run", "--quiet") == 0
    return tmp_path / "runs" / "digits_quick"


def test_run_writes_everything(finished_run, soft_label_cache, capsys):
    run = finished_run
    for name in ("config.yaml", "metrics.json", "report.md", "curves.png"):
        assert (run / name).stat().st_size > 0, name
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((run / "metrics.json").read_text())
    for role in ROLES:
        m = metrics[role]
        for key in ("test_accuracy", "val_accuracy", "test_nll", "agreement", "params", "checkpoint_bytes",
                    "train_seconds", "train_samples_per_second", "median_epoch_seconds"):
            assert m[key] is not None, (role, key)
        assert set(m["latency_ms"]) == {"batch_1", "batch_256"}
        assert 0 <= m["test_accuracy"] <= 1
        assert m["checkpoint_bytes"] == (run / role / "model.safetensors").stat().st_size
        assert len((run / role / "metrics.jsonl").read_text().splitlines()) == 3
        # Nothing for --resume is left once a step is done.
        assert not (run / role / "train_state.safetensors").exists()
    assert metrics["teacher"]["agreement"] == 1.0
    assert metrics["baseline"]["params"] == metrics["student"]["params"]
    assert metrics["teacher"]["test_accuracy"] > 0.8  # digits is easy even in 3 epochs
    assert "gap_recovered" in metrics and metrics["teacher_signal"] == "cached"
    assert len(list(soft_label_cache.glob("*.safetensors"))) == 1
    report = (run / "report.md").read_text()
    assert "student distilled" in report and "student from scratch" in report and "Gap recovered" in report
    # Where the data came from and how it was split, said in metrics.json and the report.
    data = metrics["data"]
    assert data["sizes"] == {"train": 1200, "val": 300, "test": 297}
    assert data["name"] == "digits" and data["num_classes"] == 10 and data["input_shape"] == [1, 8, 8]
    assert data["sources"][0].startswith("scikit-learn ") and data["classes"] == [str(d) for d in range(10)]
    assert "Data: digits, 1,200 train / 300 val / 297 test" in report and "## Test accuracy per class" in report


def test_the_log_opens_with_the_data(tmp_path, soft_label_cache, capsys):
    assert run_cli(tmp_path, "train") == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("data: digits: 1,200 train / 300 val / 297 test, 1x8x8, 10 classes, from scikit-learn")


def test_same_command_twice_gives_the_same_numbers(finished_run, tmp_path):
    first = json.loads((finished_run / "metrics.json").read_text())
    again = tmp_path / "again"
    assert main(["run", "recipes/digits_quick.yaml", f"out_dir={again}", *FAST, "--quiet"]) == 0
    second = json.loads((again / "digits_quick" / "metrics.json").read_text())
    for role in ROLES:
        for key in ("test_accuracy", "val_accuracy", "test_nll", "agreement"):
            assert first[role][key] == second[role][key], (role, key)
    for role in ROLES:
        a = load_file(finished_run / role / "model.safetensors")
        b = load_file(again / "digits_quick" / role / "model.safetensors")
        assert all((a[k] == b[k]).all() for k in a), role


def test_resume_continues_an_interrupted_training(tmp_path, soft_label_cache):
    """Interrupt the teacher's training after epoch 2 of 3, resume: same weights as a run without a stop."""
    from kdistill.config import load_config
    from kdistill.distill import Distiller
    from kdistill.losses import cross_entropy_objective
    from kdistill.pipeline import Pipeline
    from kdistill.train import fit

    full = tmp_path / "full"
    assert main(["train", "recipes/digits_quick.yaml", f"out_dir={full}", *FAST, "--quiet"]) == 0

    cut = tmp_path / "cut"
    cfg = load_config("recipes/digits_quick.yaml", [f"out_dir={cut}", *FAST])
    pipeline = Pipeline(cfg, progress="quiet")
    pipeline.close()  # the folder's lock: main() below opens it again
    loader = pipeline.loader("train", cfg.teacher.train)
    set_epoch = loader.set_epoch

    def crash_at_epoch_3(epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        set_epoch(epoch)

    loader.set_epoch = crash_at_epoch_3
    teacher_dir = pipeline.role_dir("teacher")
    with pytest.raises(KeyboardInterrupt):
        distiller = Distiller(None, pipeline.build("teacher"), cross_entropy_objective(), device=pipeline.device)
        fit(distiller, loader, cfg.teacher.train, val_loader=pipeline.loader("val"), out_dir=teacher_dir, seed=cfg.seed,
            inputs=distiller.fingerprint(loader))  # as the pipeline does
    assert (teacher_dir / "train_state.safetensors").exists()
    assert not (teacher_dir / "model.safetensors").exists()

    args = ["train", "recipes/digits_quick.yaml", f"out_dir={cut}", *FAST, "--quiet"]
    assert main(args) == 2  # an interrupted training is not silently restarted
    assert main([*args, "--resume"]) == 0
    a = load_file(full / "digits_quick" / "teacher" / "model.safetensors")
    b = load_file(teacher_dir / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    assert len((teacher_dir / "metrics.jsonl").read_text().splitlines()) == 3


def test_steps_alone(tmp_path, soft_label_cache, capsys):
    assert run_cli(tmp_path, "distill", "--quiet") == 2  # no teacher yet
    assert "no trained teacher" in capsys.readouterr().err
    assert run_cli(tmp_path, "train", "--quiet") == 0
    assert run_cli(tmp_path, "soft-labels", "--quiet") == 0
    assert "built" in capsys.readouterr().out
    assert run_cli(tmp_path, "soft-labels", "--quiet") == 0
    assert "already cached" in capsys.readouterr().out
    taps = "distill.losses={ce: {}, sp: {student: body.fc1, teacher: body.fc1@input}}"
    assert run_cli(tmp_path, "soft-labels", taps) == 0  # and the features its terms tap
    assert "teacher features (body.fc1@input; " in capsys.readouterr().err
    assert len(list(soft_label_cache.glob("*.npy"))) == 1
    assert run_cli(tmp_path, "distill", "--quiet") == 0
    assert run_cli(tmp_path, "train", "--baseline", "--quiet") == 0
    assert run_cli(tmp_path, "eval", "--quiet") == 0
    out = capsys.readouterr().out
    assert "student distilled" in out and "student from scratch" in out
    assert run_cli(tmp_path, "report", "--quiet") == 0
    assert (tmp_path / "runs" / "digits_quick" / "report.md").exists()


def test_a_run_can_cache_only_the_top_k_logits(tmp_path, soft_label_cache, capsys):
    assert run_cli(tmp_path, "run", "distill.top_k=3", "--quiet") == 0
    (entry,) = soft_label_cache.glob("*.safetensors")
    tensors = load_file(entry)
    assert "logits" not in tensors and tensors["top_values"].shape[1] == 3
    assert run_cli(tmp_path, "soft-labels", "distill.top_k=3", "--quiet") == 0
    assert "top 3 of 10 logits" in capsys.readouterr().out


def test_an_augmented_run_learns_from_cached_views(tmp_path, soft_label_cache, capsys):
    assert run_cli(tmp_path, "run", "train.augment.crop_padding=1", "distill.views=3") == 0
    assert "teacher signal: cached_views (per-sample augmentation" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "runs" / "digits_quick" / "metrics.json").read_text())
    assert metrics["teacher_signal"] == "cached_views"
    (entry,) = soft_label_cache.glob("*.safetensors")
    logits = load_file(entry)["logits"]
    assert logits.dtype == torch.float16 and logits.shape == (3 * metrics["data"]["sizes"]["train"], 10)


def test_a_mixed_run_uses_the_live_teacher(tmp_path, soft_label_cache, capsys):
    assert run_cli(tmp_path, "run", "train.augment.mixup=0.2") == 0
    assert "teacher signal: live (mixup / cutmix: the teacher sees each mixed batch)" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "runs" / "digits_quick" / "metrics.json").read_text())
    assert metrics["teacher_signal"] == "live"
    assert not list(soft_label_cache.glob("*.safetensors"))


def test_a_changed_teacher_needs_a_new_name_or_force(finished_run, tmp_path, capsys):
    assert run_cli(tmp_path, "run", "--quiet", "teacher.train.lr=0.002") == 2
    assert "which changes the teacher: every step would be redone" in capsys.readouterr().err
    assert run_cli(tmp_path, "run", "--quiet", "teacher.train.lr=0.002", "--force") == 0


def weights(run) -> dict:
    return {role: (run / role / "model.safetensors").read_bytes() for role in ROLES}


def test_a_change_of_distillation_keys_keeps_the_teacher_and_the_baseline(finished_run, tmp_path, capsys):
    before = weights(finished_run)
    capsys.readouterr()
    assert run_cli(tmp_path, "check", "distill.temperature=2") == 0
    assert "config changed (distill.temperature changed): `run` retrains student, keeps teacher and baseline" \
        in capsys.readouterr().out
    assert run_cli(tmp_path, "eval", "distill.temperature=2") == 2  # eval does not train: it says what would
    assert "distill.temperature changed since its models were trained; `kdistill run` retrains student" \
        in capsys.readouterr().err
    assert run_cli(tmp_path, "run", "distill.temperature=2") == 0
    assert "config changed (distill.temperature changed): retraining student; keeping teacher and baseline" \
        in capsys.readouterr().err
    after = weights(finished_run)
    assert after["teacher"] == before["teacher"] and after["baseline"] == before["baseline"]
    assert after["student"] != before["student"]
    assert "temperature: 2" in (finished_run / "config.yaml").read_text()


def test_a_change_of_student_training_keys_retrains_both_students(finished_run, tmp_path, capsys):
    before = weights(finished_run)
    assert run_cli(tmp_path, "run", "--quiet", "train.lr=0.001") == 0
    after = weights(finished_run)
    assert after["teacher"] == before["teacher"]
    assert after["baseline"] != before["baseline"] and after["student"] != before["student"]


def test_batchnorm_teacher_from_the_residual_family(tmp_path, soft_label_cache):
    """A teacher with BatchNorm buffers (0-dim tensors) through training, caching and distillation."""
    recipe = tmp_path / "resnet.yaml"
    recipe.write_text(
        "name: tiny_resnet\ndata: {name: digits, val_size: 300}\n"
        "teacher: {name: resnet, kwargs: {width: 4, depth: 1}, train: {epochs: 1, precision: bf16}}\n"
        "student: {name: seed_student}\ntrain: {epochs: 1}\neval: {latency_repeats: 1}\n"
    )
    assert main(["run", str(recipe), f"out_dir={tmp_path / 'runs'}", "--quiet"]) == 0
    metrics = json.loads((tmp_path / "runs" / "tiny_resnet" / "metrics.json").read_text())
    assert metrics["teacher_signal"] == "cached"
    assert {"teacher", "baseline", "student"} <= metrics.keys()


def test_label_smoothing_on_a_teacher_warns(tmp_path, capsys):
    assert run_cli(tmp_path, "train", "--quiet", "teacher.train.label_smoothing=0.1") == 0
    assert "label_smoothing > 0 can erase the dark knowledge" in capsys.readouterr().err


def test_a_student_is_not_reused_with_another_teacher(tmp_path, soft_label_cache, capsys):
    assert run_cli(tmp_path, "train", "--quiet", "seed=1") == 0
    assert run_cli(tmp_path, "train", "--quiet", "seed=2", "name=other") == 0
    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(tmp_path / "runs" / "digits_quick" / "teacher" / "model.safetensors", teacher)
    args = ["name=reuse", f"teacher.checkpoint={teacher}", "--quiet"]
    assert run_cli(tmp_path, "run", *args) == 0
    shutil.copy(tmp_path / "runs" / "other" / "teacher" / "model.safetensors", teacher)  # same path, new weights
    assert run_cli(tmp_path, "run", *args) == 2
    assert "distilled from another teacher" in capsys.readouterr().err


def test_a_loaded_teachers_training_keys_change_nothing():
    """With one teacher checkpoint on both sides the teacher is loaded, not trained: a recipe's new teacher
    schedule must not make a sweep rerun its finished cells (or a run folder discard its students)."""
    from omegaconf import OmegaConf

    from kdistill.pipeline import changed_keys

    def config(checkpoint, teacher_epochs, student_epochs=5):
        return OmegaConf.create({"teacher": {"checkpoint": checkpoint, "train": {"epochs": teacher_epochs}},
                                 "train": {"epochs": student_epochs}})

    assert changed_keys(config("t.safetensors", 30), config("t.safetensors", 39)) == []
    assert changed_keys(config("t.safetensors", 30), config("t.safetensors", 30, 6)) == ["train.epochs"]
    assert changed_keys(config(None, 30), config(None, 39)) == ["teacher.train.epochs"]
    assert changed_keys(config("t.safetensors", 30), config("u.safetensors", 39)) == [
        "teacher.checkpoint", "teacher.train.epochs"]


def test_a_config_written_before_a_key_existed_is_not_a_change():
    """Run folders made by an older kdistill lack the keys added since; those take their defaults."""
    from omegaconf import OmegaConf

    from kdistill.config import load_config
    from kdistill.pipeline import changed_keys

    new = load_config("recipes/digits_quick.yaml")
    old = OmegaConf.to_container(new, resolve=True)
    del old["compress"], old["data"]["labelled_fraction"], old["distill"]["pseudo_labels"]
    assert changed_keys(OmegaConf.create(old), new) == []
    old["data"]["labelled_fraction"] = 0.5  # a value that differs from the default still counts
    assert changed_keys(OmegaConf.create(old), new) == ["data.labelled_fraction"]
