"""Unlabelled data: withheld labels, another data set's pool, pseudo-label filtering, Noisy Student, model noise."""

import json

import numpy as np
import pytest
import torch
from conftest import fails_cleanly

from kdistill.config import load_config
from kdistill.data.sets import UNLABELLED
from kdistill.data.unlabelled import select_pseudo_labelled, withhold_labels
from kdistill.functional import cross_entropy
from kdistill.models import create_model
from kdistill.pipeline import Pipeline, recipe_data
from kdistill.schemes import run_recipe

DIGITS = "recipes/digits_quick.yaml"


def test_withheld_labels_are_a_fixed_part_of_the_training_split():
    data = recipe_data(load_config(DIGITS))
    tenth = withhold_labels(data, 0.1, seed=0)
    assert len(tenth.train) == 120 and len(tenth.unlabelled) == 1080
    assert bool((tenth.unlabelled.labels == UNLABELLED).all()) and bool((tenth.train.labels >= 0).all())
    # Together they are the training split, each image once.
    together = torch.cat([tenth.train.images, tenth.unlabelled.images]).flatten(1)
    assert sorted(map(bytes, together.numpy())) == sorted(map(bytes, data.train.images.flatten(1).numpy()))
    again = withhold_labels(data, 0.1, seed=0)
    assert torch.equal(again.train.images, tenth.train.images)
    assert not torch.equal(withhold_labels(data, 0.1, seed=1).train.images, tenth.train.images)
    assert tenth.digest() != data.digest()
    assert withhold_labels(data, 1.0, seed=0) is data


def test_pseudo_labels_are_filtered_by_confidence_and_balanced():
    logits = torch.tensor([[5.0, 0, 0], [4.0, 0, 0], [3.0, 0, 0], [0, 6.0, 0], [0, 0.5, 0], [0, 0, 0.1]])
    rows, said = select_pseudo_labelled(logits)
    assert rows.tolist() == [0, 1, 2, 3, 4, 5] and said.endswith("6 kept")
    rows, _ = select_pseudo_labelled(logits, min_confidence=0.9)  # p = 0.987, 0.965, 0.91, 0.995 pass
    assert rows.tolist() == [0, 1, 2, 3]
    # Balanced: as many per pseudo-class as the rarest non-empty class has, the most confident ones.
    rows, said = select_pseudo_labelled(logits, min_confidence=0.9, balance=True)
    assert rows.tolist() == [0, 3] and "balanced to 1 per pseudo-class (1 classes have none)" in said
    rows, _ = select_pseudo_labelled(logits, balance=True)
    assert rows.tolist() == [0, 3, 5]
    with pytest.raises(Exception, match=r"drops all 6 unlabelled samples \(the teacher's highest confidence on "
                                        r"them is 0\.995\)"):
        select_pseudo_labelled(logits, min_confidence=0.999)


def test_the_cross_entropy_reads_only_labelled_rows():
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([2, UNLABELLED, 0, UNLABELLED])
    torch.testing.assert_close(cross_entropy(logits, labels),
                               torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]]))
    none = cross_entropy(logits, torch.full((4,), UNLABELLED))
    none.backward()
    assert none.item() == 0 and bool((logits.grad == 0).all())


def test_a_student_learns_from_a_tenth_of_the_labels_and_the_rest_unlabelled(tmp_path, soft_label_cache):
    cfg = load_config(DIGITS, [f"out_dir={tmp_path}", "data.labelled_fraction=0.1", "eval.latency_repeats=1",
                               "distill.pseudo_labels.min_confidence=0.5"])
    with Pipeline(cfg, progress="quiet") as pipeline:
        metrics = pipeline.run()
        assert len(pipeline.data.train) == 120 and len(pipeline.data.unlabelled) == 1080
        kept = len(pipeline.pool_rows)
        assert 0 < kept <= 1080
        teacher_epoch = json.loads((pipeline.role_dir("teacher") / "metrics.jsonl").read_text().splitlines()[0])
        student_epoch = json.loads((pipeline.role_dir("student") / "metrics.jsonl").read_text().splitlines()[0])
    # The teacher saw the 120 labelled samples; the student those and the pool rows kept.
    assert teacher_epoch["samples_per_second"] * teacher_epoch["epoch_seconds"] == pytest.approx(120)
    assert student_epoch["samples_per_second"] * student_epoch["epoch_seconds"] == pytest.approx(120 + kept)
    assert 0 <= student_epoch["train_accuracy"] <= 1  # of the labelled rows
    # With 120 labels the student from scratch is far behind the teacher; the pool closes most of the gap.
    assert metrics["student"]["test_accuracy"] > metrics["baseline"]["test_accuracy"] + 0.05


def _write_npz(path, size):
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 17, (40, size, size), dtype=np.uint8),
             y_train=rng.integers(0, 10, 40), x_test=rng.integers(0, 17, (10, size, size), dtype=np.uint8),
             y_test=rng.integers(0, 10, 10))


def test_another_data_sets_images_join_the_pool(tmp_path, soft_label_cache):
    _write_npz(tmp_path / "pool.npz", 8)
    cfg = load_config(DIGITS, [f"out_dir={tmp_path}", "data.unlabelled.name=npz",
                               f"data.unlabelled.root={tmp_path / 'pool.npz'}", "data.unlabelled.max_size=30"])
    data = recipe_data(cfg)
    assert len(data.unlabelled) == 30 and len(data.train) == 1200
    assert "30 unlabelled images of npz" in data.describe()


@pytest.mark.parametrize("overrides, expected", [
    (["data.labelled_fraction=0"], "data.labelled_fraction: must be > 0"),
    (["data.labelled_fraction=1.5"], "data.labelled_fraction: must be > 0 and finite and <= 1"),
    (["data.labelled_fraction=0.5", "distill.losses={ce: {}}"], "the unlabelled pool would teach nothing"),
    (["data.labelled_fraction=0.5", "distill.losses.dkd={weight: 1}"], "distill.losses.dkd reads each sample's"),
    (["data.labelled_fraction=0.5", "train.augment.mixup=0.2"], "mixup / cutmix blend labels"),
    (["scheme=noisy_student"], "noisy_student learns from unlabelled images"),
    (["scheme=noisy_student", "data.labelled_fraction=0.5", "noisy_student.rounds=2",
      "noisy_student.students=[{name: mlp}]"], "lists 1 models for 2 rounds"),
])
def test_bad_unlabelled_settings(capsys, tmp_path, overrides, expected):
    fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path}", *overrides], expected)
    assert not any(tmp_path.rglob("*.safetensors"))


def test_a_pool_of_another_shape_is_refused(capsys, tmp_path):
    _write_npz(tmp_path / "pool.npz", 28)
    fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path}", "data.unlabelled.name=npz",
                           f"data.unlabelled.root={tmp_path / 'pool.npz'}"],
                  "data.unlabelled: the pool's images are 1x28x28 but the digits images are 1x8x8")
    assert not any(tmp_path.rglob("*.safetensors"))


def test_a_confidence_threshold_that_keeps_nothing_is_refused_before_the_student_trains(capsys, tmp_path,
                                                                                       soft_label_cache):
    err = fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path}", "data.labelled_fraction=0.1",
                                 "teacher.train.epochs=1", "distill.pseudo_labels.min_confidence=0.99"],
                        "distill.pseudo_labels.min_confidence=0.99 drops all 1,080 unlabelled samples")
    assert "lower it" in err
    assert not (tmp_path / "digits_quick" / "student" / "metrics.jsonl").exists()


def test_noisy_student_rounds_each_teach_the_next(tmp_path, soft_label_cache):
    cfg = load_config(DIGITS, [f"out_dir={tmp_path}", "scheme=noisy_student", "data.labelled_fraction=0.2",
                               "noisy_student.rounds=2", "noisy_student.noise={dropout: 0.2}",
                               "teacher.name=mlp", "teacher.kwargs={hidden: [32]}", "student.kwargs={hidden: [32]}",
                               "train.epochs=3", "teacher.train.epochs=3", "eval.latency_repeats=1"])
    metrics = run_recipe(cfg, progress="quiet")
    assert metrics["rows"] == ["teacher", "round1", "baseline", "student"]
    folder = tmp_path / "digits_quick"
    round2 = load_config(folder / "round2" / "config.yaml")
    assert round2.teacher.checkpoint == str(folder / "round1" / "student" / "model.safetensors")
    assert round2.student.kwargs.dropout == 0.2 and round2.data.labelled_fraction == 0.2
    # Round 2's baseline is round 1's (the same noised student from scratch), taken, not retrained.
    assert (folder / "round2" / "baseline" / "model.safetensors").read_bytes() == \
        (folder / "round1" / "baseline" / "model.safetensors").read_bytes()


def test_resnet_stochastic_depth_and_dropout_are_training_noise_only():
    torch.manual_seed(0)
    plain = create_model("resnet", (1, 8, 8), 10, width=4, depth=2, stages=2)
    torch.manual_seed(0)
    noisy = create_model("resnet", (1, 8, 8), 10, width=4, depth=2, stages=2, drop_path=0.4, dropout=0.5)
    assert plain.state_dict().keys() == noisy.state_dict().keys()  # checkpoints load either way
    blocks = [b for stage in noisy.stages for b in stage]
    assert [round(b.drop_path, 2) for b in blocks] == [0.1, 0.2, 0.3, 0.4]  # linear decay to the last block
    for module in noisy.modules():  # the blocks' branches are zero-initialised: give them weight
        if hasattr(module, "bn2"):
            torch.nn.init.ones_(module.bn2.weight)
    x = torch.randn(16, 1, 8, 8)
    noisy.eval()
    torch.testing.assert_close(noisy(x), noisy(x))
    noisy.train()
    assert not torch.equal(noisy(x), noisy(x))
    with pytest.raises(Exception, match="drop_path must be a number in"):
        create_model("resnet", (1, 8, 8), 10, drop_path=1.0)
