"""Every kind of bad input ends with one clear line on stderr and exit code 2."""

import gzip
import struct

import pytest
import torch
from safetensors.torch import save_file

from kdistill.cli import main

DIGITS = "recipes/digits_quick.yaml"
FAST = ["teacher.train.epochs=1", "train.epochs=1", "eval.latency_repeats=1"]


def fails_cleanly(capsys, argv, expected: str) -> str:
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdistill: error: "), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert expected in err, err
    return err


@pytest.mark.parametrize(
    "override, expected",
    [
        ("distill.temperatur=2", "did you mean distill.temperature?"),
        ("train.lr=fast", "train.lr: wrong type"),
        ("distill.temperature=0", "distill.temperature: must be >= 0.01"),
        ("distill.losses.tang.alpha=1.5", "alpha must be in [0, 1]"),
        ("train.batch_size=0", "train.batch_size: must be >= 1"),
        ("student.name=resnet_huge", "unknown model"),
        ("data.name=fashion_mnst", "fashion_mnist"),
        ("distill.views=0", "distill.views: the teacher's logits are cached for this many augmented views"),
        ("distill.top_k=-1", "distill.top_k: the number of logits kept per cached row"),
        ("distill.teacher_signal=cache", "distill.teacher_signal: 'cache' is not one of auto, live"),
        ("train.augment.resized_crop=[0.5,0.2]", "train.augment.resized_crop: must be [min, max]"),
        ("train.augment.color_jitter=2", "train.augment.color_jitter: must be >= 0 and finite and <= 1, got 2.0"),
        ("teacher.train.augment.mixup=-1", "teacher.train.augment.mixup: must be >= 0"),
    ],
)
def test_config_errors(capsys, tmp_path, override, expected):
    fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path}", override], expected)
    assert not any(tmp_path.rglob("*.safetensors"))


def test_missing_data_set(capsys, tmp_path):
    (tmp_path / "data").mkdir()
    err = fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path}", "data.name=kmnist",
                                 f"data.root={tmp_path / 'data'}", "data.download=false"], "kmnist")
    assert str(tmp_path / "data") in err


def test_a_data_root_that_does_not_exist(capsys, tmp_path):
    err = fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path}", "data.name=fashion_mnist",
                                 f"data.root={tmp_path / 'nowhere'}"], "does not exist")
    assert str(tmp_path / "nowhere") in err


def test_a_val_size_larger_than_the_training_set(capsys, tmp_path):
    fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path}", "data.val_size=5000"],
                  "data.val_size=5000 asks for 5000 validation images but digits has only 1500")


def _write_idx(path, array: torch.Tensor):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.dim()) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.numpy().tobytes())


def test_truncated_idx_file(capsys, tmp_path):
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    for split, n in (("train", 200), ("t10k", 50)):
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", torch.zeros(n, 28, 28, dtype=torch.uint8))
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", torch.zeros(n, dtype=torch.uint8))
    broken = folder / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(broken.read_bytes())
    broken.write_bytes(gzip.compress(data[: len(data) // 2]))
    fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path / 'runs'}", "data.name=mnist",
                           f"data.root={tmp_path / 'data'}", "data.download=false", "data.val_size=20"],
                  "train-images-idx3-ubyte")


def test_teacher_and_student_with_different_class_counts(capsys, tmp_path, monkeypatch):
    (tmp_path / "five_classes.py").write_text(
        "import torch.nn as nn\n"
        "class FiveWay(nn.Sequential):\n"
        "    def __init__(self):\n"
        "        super().__init__(nn.Flatten(), nn.Linear(64, 5))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: {name: digits, val_size: 300}\nteacher: {name: 'five_classes:FiveWay'}\n"
                      "student: {name: mlp}\n")
    fails_cleanly(capsys, ["run", str(recipe), f"out_dir={tmp_path / 'runs'}"], "outputs 5 classes but digits has 10")
    assert not any((tmp_path / "runs").rglob("*.safetensors"))


def test_checkpoint_of_another_architecture(capsys, tmp_path, soft_label_cache):
    assert main(["train", DIGITS, f"out_dir={tmp_path / 'a'}", *FAST, "--baseline", "--quiet"]) == 0
    student_weights = tmp_path / "a" / "digits_quick" / "baseline" / "model.safetensors"
    fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path / 'b'}", *FAST,
                           f"teacher.checkpoint={student_weights}"], "does not fit the teacher")


def test_checkpoint_that_is_a_pickle_is_never_loaded(capsys, tmp_path):
    pickle_file = tmp_path / "teacher.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, pickle_file)
    fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path / 'runs'}", *FAST,
                           f"teacher.checkpoint={pickle_file}"], "not a readable safetensors file")


def test_truncated_safetensors_checkpoint(capsys, tmp_path):
    good = tmp_path / "t.safetensors"
    save_file({"w": torch.zeros(100)}, good)
    good.write_bytes(good.read_bytes()[:-50])
    fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path / 'runs'}", *FAST, f"teacher.checkpoint={good}"],
                  "not a readable safetensors file")


def test_missing_checkpoint(capsys, tmp_path):
    missing = tmp_path / "no.safetensors"
    fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path / 'runs'}", f"teacher.checkpoint={missing}"], "not found")


def test_missing_recipe(capsys, tmp_path):
    fails_cleanly(capsys, ["run", str(tmp_path / "nope.yaml")], "not found")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("distill.temperature=inf", "distill.temperature: must be >= 0.01 and finite"),
        ("distill.losses.kd.temperature=.nan", "distill.losses.kd.temperature: must be a finite number"),
        ("distill.losses.kd.weight=.nan", "distill.losses.kd.weight: must be a number >= 0"),
        ("distill.losses.kd=0.5", "distill.losses.kd: must be a mapping like {weight: 0.5}"),
        ("name=${nope}", "nope"),
    ],
)
def test_non_finite_and_malformed_values(capsys, tmp_path, override, expected):
    fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path}", override], expected)


def test_a_failed_start_does_not_claim_the_run_folder(capsys, tmp_path):
    fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path}", "student.kwargs.widht=3"], "does not take argument")
    assert not (tmp_path / "digits_quick").exists()


def test_a_model_argument_of_the_wrong_kind(capsys, tmp_path):
    fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path}", "student.kwargs.hidden=wide"], "hidden must be a list")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.augment.mixup=0.2", "distill.teacher_signal=cached_views"],
         "blend two images per batch, so the teacher must see each mixed batch; use live"),
        (["train.augment.cutmix=1", "distill.teacher_signal=cached"], "the teacher must see each mixed batch"),
        (["train.augment.hflip=true", "distill.teacher_signal=cached"], "views the teacher never saw"),
        (["distill.teacher_signal=cached_views"], "train.augment is off: use cached"),
        (["train.augment.cutout=20"], "train.augment.cutout=20 is larger than the 8x8 images"),
    ],
)
def test_a_teacher_signal_or_augmentation_that_cannot_work(capsys, tmp_path, overrides, expected):
    fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path}", *overrides], expected)
    assert not any(tmp_path.rglob("*.safetensors"))
