"""CIFAR archives (read without running pickled code) and .npz arrays: small files built here."""

import hashlib
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from test_hostile_runs import DIGITS, cli, refused

from kdistill.data import cifar, download, load_data, npz  # noqa: F401  (importing registers them)
from kdistill.errors import KdistillError

TINY_RUN = ["teacher.name=mlp", "teacher.kwargs.hidden=[16]", "student.name=mlp", "student.kwargs.hidden=[8]",
            "teacher.train.epochs=1", "train.epochs=1", "eval.latency_repeats=1", "eval.latency_batches=[1]",
            "data.val_size=4", "data.download=false", "threads=1"]


def batch(n: int, classes: int, label_key: bytes, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"fake", label_key: [int(k) for k in rng.integers(0, classes, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}


def dump(path, value) -> None:
    path.write_bytes(pickle.dumps(value, protocol=2))


def write_cifar10(root, n: int = 6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        dump(folder / f"data_batch_{i}", batch(n, 10, b"labels", seed=i))
    dump(folder / "test_batch", batch(n, 10, b"labels", seed=9))
    dump(folder / "batches.meta", {b"label_names": [f"class{k}".encode() for k in range(10)], b"num_vis": 3072})
    return folder


def write_cifar100(root, n: int = 20):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    dump(folder / "train", batch(n, 100, b"fine_labels", seed=1))
    dump(folder / "test", batch(n, 100, b"fine_labels", seed=2))
    dump(folder / "meta", {b"fine_label_names": [f"c{k}".encode() for k in range(100)],
                           b"coarse_label_names": [b"x"] * 20})
    return folder


def test_cifar10_loads_from_the_official_layout(tmp_path):
    folder = write_cifar10(tmp_path)
    splits = load_data("cifar10", root=tmp_path, val_size=5, download=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (25, 5, 6)
    assert splits.input_shape == (3, 32, 32) and splits.classes[3] == "class3"
    first = pickle.loads((folder / "test_batch").read_bytes())
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32.
    assert torch.equal(splits.test.images[0, 1], torch.from_numpy(first[b"data"][0, 1024:2048].reshape(32, 32)))
    assert splits.test.labels.tolist() == first[b"labels"]
    assert splits.sources[0] == str(folder / "data_batch_1") and len(splits.sources) == 7


def test_cifar100_uses_fine_labels(tmp_path):
    write_cifar100(tmp_path)
    splits = load_data("cifar100", root=tmp_path / "cifar-100-python", val_size=4, download=False)
    assert splits.num_classes == 100 and splits.classes[99] == "c99" and len(splits.train) == 16


class Payload:
    """A pickle that, unpickled by pickle.load, would create a file: the attack."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_archive_does_not_run_code(tmp_path):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    dump(folder / "test_batch", {b"data": Payload(marker), b"labels": []})
    with pytest.raises(KdistillError, match="test_batch holds a pickle of something other than plain data "
                                            r"\(_?io.open\)"):  # _io.open from Python 3.12
        load_data("cifar10", root=tmp_path, val_size=5, download=False)
    assert not marker.exists()  # the payload never ran


@pytest.mark.parametrize("damage, message", [
    (lambda b: b.update({b"data": b[b"data"][:, :100]}), r"'data' must be uint8 \[N, 3072\]"),
    (lambda b: b.update({b"data": b[b"data"].astype(np.float32)}), "must be uint8"),
    (lambda b: b.update({b"labels": b[b"labels"][:-1]}), "must hold 6 integer labels"),
    (lambda b: b.update({b"labels": [10] * 6}), r"labels fall outside 0..9"),
])
def test_bad_cifar_arrays_are_refused(tmp_path, damage, message):
    folder = write_cifar10(tmp_path)
    broken = batch(6, 10, b"labels")
    damage(broken)
    dump(folder / "data_batch_3", broken)
    with pytest.raises(KdistillError, match=message):
        load_data("cifar10", root=tmp_path, val_size=5, download=False)


def test_missing_archive_without_download(tmp_path):
    with pytest.raises(KdistillError, match="cifar10: not found in .* and download is off; put the official"):
        load_data("cifar10", root=tmp_path, download=False)


def archive_bytes(tmp_path) -> bytes:
    source = tmp_path / "source"
    write_cifar10(source)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return buffer.getvalue()


def test_download_checks_the_checksum_and_extracts(tmp_path, monkeypatch):
    payload = archive_bytes(tmp_path)
    monkeypatch.setattr(download, "urlopen", lambda url, timeout: io.BytesIO(payload))
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(KdistillError, match="checksum mismatch"):
        load_data("cifar10", root=root, val_size=5)
    assert not list(root.iterdir())  # nothing half-written left
    monkeypatch.setattr(cifar, "CIFAR10", cifar.CIFAR10.__class__(
        **{**cifar.CIFAR10.__dict__, "md5": hashlib.md5(payload).hexdigest()}))
    splits = load_data("cifar10", root=root, val_size=5)
    assert len(splits.test) == 6 and not (root / "cifar-10-batches-py.tar.gz").exists()


def test_cifar10_trains_for_an_epoch_from_the_command_line(tmp_path, capsys):
    write_cifar10(tmp_path / "data")
    code, err = cli(capsys, "run", DIGITS, "data.name=cifar10", f"data.root={tmp_path / 'data'}",
                    f"out_dir={tmp_path / 'runs'}", *TINY_RUN)
    assert code == 0, err
    metrics = json.loads((tmp_path / "runs" / "digits_quick" / "metrics.json").read_text())
    assert metrics["data"]["input_shape"] == [3, 32, 32] and metrics["data"]["classes"][0] == "class0"


# --- npz -------------------------------------------------------------------------------------------

def write_npz(path, x_train, y_train, x_test, y_test, **extra):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **extra)
    return path


def labels(n: int, k: int = 3) -> np.ndarray:
    return np.arange(n) % k


@pytest.mark.parametrize("shape, channels", [((12, 5, 6), 1), ((12, 5, 6, 3), 3), ((12, 3, 5, 6), 3),
                                             ((12, 5, 6, 1), 1)])
def test_npz_layouts(tmp_path, shape, channels):
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    path = write_npz(tmp_path / "d.npz", x, labels(12), x[:4], labels(4))
    splits = load_data("npz", root=path, val_size=2)
    assert splits.input_shape == (channels, 5, 6) and splits.test.images.shape == (4, channels, 5, 6)
    pixel = x[1, 2, 3] if len(shape) == 3 else x[1, 2, 3, -1] if shape[-1] in (1, 3) and shape[1] not in (1, 3) \
        else x[1, -1, 2, 3]
    assert int(splits.test.images[1, -1, 2, 3]) == int(pixel)
    assert splits.classes == ["0", "1", "2"] and splits.sources == [str(path)]


def test_npz_class_names_and_a_folder_holding_one(tmp_path):
    x = np.zeros((6, 4, 4), np.uint8)
    write_npz(tmp_path / "d.npz", x, labels(6, 2), x, labels(6, 2), class_names=np.array(["cat", "dog"]))
    assert load_data("npz", root=tmp_path, val_size=2).classes == ["cat", "dog"]
    write_npz(tmp_path / "e.npz", x, labels(6, 2), x, labels(6, 2))
    with pytest.raises(KdistillError, match="holds 2 .npz files \\(d.npz, e.npz\\); point data.root at"):
        load_data("npz", root=tmp_path)


@pytest.mark.parametrize("arrays, message", [
    ((np.zeros((6, 4, 4), np.uint8), labels(5), np.zeros((2, 4, 4), np.uint8), labels(2)),
     "y_train holds 5 labels but its images number 6"),
    ((np.zeros((6, 4, 4), np.float32), labels(6), np.zeros((2, 4, 4), np.uint8), labels(2)), "not uint8"),
    ((np.zeros((6, 4), np.uint8), labels(6), np.zeros((2, 4), np.uint8), labels(2)), "has shape \\[6, 4\\]"),
    ((np.zeros((6, 4, 4), np.uint8), -labels(6) - 1, np.zeros((2, 4, 4), np.uint8), labels(2)), "negative label"),
])
def test_bad_npz_arrays(tmp_path, arrays, message):
    path = write_npz(tmp_path / "d.npz", *arrays)
    with pytest.raises(KdistillError, match=message):
        load_data("npz", root=path, val_size=2)


def test_npz_labels_beyond_the_class_names(tmp_path):
    x = np.zeros((6, 4, 4), np.uint8)
    path = write_npz(tmp_path / "d.npz", x, labels(6, 3), x, labels(6, 3), class_names=np.array(["a", "b"]))
    with pytest.raises(KdistillError, match="label 2 is out of range for the 2 class_names"):
        load_data("npz", root=path, val_size=2)


def test_npz_with_objects_or_missing_arrays(tmp_path):
    x = np.zeros((6, 4, 4), np.uint8)
    path = tmp_path / "o.npz"
    np.savez(path, x_train=np.array([{"a": 1}] * 6, dtype=object), y_train=labels(6), x_test=x, y_test=labels(6))
    with pytest.raises(KdistillError, match="holds Python objects"):
        load_data("npz", root=path)
    np.savez(path, x_train=x, y_train=labels(6))
    with pytest.raises(KdistillError, match="lacks x_test, y_test; it holds x_train, y_train"):
        load_data("npz", root=path)
    with pytest.raises(KdistillError, match="needs data.root"):
        load_data("npz")


def test_npz_from_the_command_line(tmp_path, capsys):
    x = np.random.default_rng(0).integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
    path = write_npz(tmp_path / "d.npz", x, labels(20), x[:6], labels(6))
    code, err = cli(capsys, "run", DIGITS, "data.name=npz", f"data.root={path}", f"out_dir={tmp_path / 'runs'}",
                    *TINY_RUN)
    assert code == 0, err
    refused(capsys, ["run", DIGITS, "data.name=npz", f"data.root={tmp_path / 'nope.npz'}", *TINY_RUN],
            "does not exist")
    write_npz(path, x, labels(20) + 1, x[:6], labels(6), class_names=np.array(["a", "b", "c"]))
    refused(capsys, ["check", DIGITS, "data.name=npz", f"data.root={path}", *TINY_RUN],
            "label 3 is out of range for the 3 class_names")
