"""Hostile data: gzip bombs, absurd IDX headers, inconsistent splits, loaders breaking their contract; digests."""

import gzip
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdistill.data import DATASETS, ImageSet, idx, load_data, mnist, register_dataset
from kdistill.data.idx import read_idx
from kdistill.errors import KdistillError
from kdistill.memory import available_memory

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def idx_header(*shape: int) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, len(shape)) + struct.pack(f">{len(shape)}I", *shape)


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_header(*array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


# --- IDX files ---------------------------------------------------------------------------------

BOMB_READER = """
import resource, sys
from pathlib import Path
from kdistill.data.idx import read_idx
from kdistill.errors import KdistillError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_idx(Path(sys.argv[1]))
except KdistillError as error:
    print(error)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)  # peak growth, MiB (Linux counts KiB)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_gzip_bomb_is_refused_without_inflating_it(tmp_path):
    # A valid 10 x 28 x 28 file, then 256 MiB of zeros: about 250 KB on disk.
    bomb = tmp_path / "bomb-idx3-ubyte.gz"
    with gzip.GzipFile(bomb, "wb") as out:
        out.write(idx_header(10, 28, 28) + bytes(10 * 28 * 28))
        zeros = bytes(1 << 20)
        for _ in range(256):
            out.write(zeros)
    assert bomb.stat().st_size < 1 << 20
    # A fresh process, so that the peak resident size measures this read alone.
    result = subprocess.run([sys.executable, "-c", BOMB_READER, str(bomb)], capture_output=True, text=True,
                            check=True, timeout=120)
    message, growth = result.stdout.strip().splitlines()
    assert int(growth) < 32, f"reading the bomb grew the process by {growth} MiB"
    assert str(bomb) in message and "goes on past the 7840 values its header says" in message


@pytest.mark.parametrize("name", ["x-idx5-ubyte", "x-idx5-ubyte.gz"])
def test_dimensions_whose_product_overflows_int64_are_refused(tmp_path, name):
    # 65536**4 * 5 = 5 * 2**64: in int64 arithmetic that wraps round to 0, the size of the (empty) data.
    path = tmp_path / name
    data = idx_header(65536, 65536, 65536, 65536, 5)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    with pytest.raises(KdistillError, match=name) as caught:
        read_idx(path)
    assert "header says" in one_line(caught)


def test_gz_header_promising_more_than_deflate_can_give_is_refused(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_header(100_000, 100, 100) + bytes(1000)))  # 1e9 values from ~1 KB
    with pytest.raises(KdistillError, match="more than a [0-9]+-byte gzip file can hold") as caught:
        read_idx(path)
    one_line(caught)


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_header_promising_more_than_memory_is_refused(tmp_path, monkeypatch, name):
    path = write_idx(tmp_path / name, np.zeros((10, 28, 28)))
    monkeypatch.setattr(idx, "available_memory", lambda: 5000)
    with pytest.raises(KdistillError, match="7840 values, more than the 5000 bytes of memory available") as caught:
        read_idx(path)
    one_line(caught)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux reports available memory")
def test_available_memory_is_plausible_on_linux():
    total = Path("/proc/meminfo").read_text().split()[1]  # "MemTotal: N kB" comes first
    assert 0 < available_memory() <= int(total) * 1024


# --- load_data checks every split before training ---------------------------------------------

def images(n: int, size: int = 8, channels: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=torch.Generator())


def image_set(n: int, size: int = 8, classes: int = 2) -> ImageSet:
    return ImageSet(images(n, size), torch.arange(n) % classes)


@pytest.fixture
def loader():
    """Register a loader returning `result` as data set 'test_hostile', for one test."""
    def register(result):
        register_dataset("test_hostile", "returns whatever the test gives")(lambda request: result)
    yield register
    DATASETS.pop("test_hostile", None)


TRAIN = image_set(20)
CLASSES = ["a", "b"]


@pytest.mark.parametrize("result, message", [
    (None, "its loader must return LoadedData\\(train, test, classes, sources\\) or .* got NoneType"),
    ((TRAIN, TRAIN), "its loader must return .* got tuple"),
    ((TRAIN, "test.bin", CLASSES), "returned a str as the test split"),
    ((TRAIN, TRAIN, "ab"), "class names must be a list of strings, got 'ab'"),
    ((TRAIN, TRAIN, [0, 1]), "class names must be a list of strings"),
    ((TRAIN, TRAIN, ["a"]), "needs at least two distinct class names, got \\['a'\\]"),
    ((TRAIN, TRAIN, ["a", "a"]), "needs at least two distinct class names"),
    ((TRAIN, image_set(0), CLASSES), "the test split is empty"),
    ((TRAIN, image_set(10, size=9), CLASSES), r"test images are \(C, H, W\) = \(1, 9, 9\) but training images are "
                                              r"\(1, 8, 8\)"),
    ((ImageSet(images(20, 0), torch.zeros(20, dtype=torch.long)), image_set(10, 0), CLASSES), "have no pixels"),
], ids=["none", "pair", "test-not-a-set", "classes-str", "classes-ints", "one-class", "duplicate-classes",
        "empty-test", "test-size", "no-pixels"])
def test_load_data_refuses_inconsistent_data_before_training(loader, result, message):
    loader(result)
    with pytest.raises(KdistillError, match=message) as caught:
        load_data("test_hostile", val_size=5)
    one_line(caught)


def test_image_set_of_numpy_arrays_says_to_convert():
    with pytest.raises(KdistillError, match="images must be a torch.Tensor, got ndarray") as caught:
        ImageSet(np.zeros((3, 1, 8, 8), np.uint8), torch.zeros(3, dtype=torch.long))
    one_line(caught)


@pytest.mark.parametrize("test_shape, message", [
    ((0, 28, 28), "the test split is empty"),
    ((10, 32, 32), r"test images are \(C, H, W\) = \(1, 32, 32\) but training images are \(1, 28, 28\)"),
])
def test_idx_files_that_do_not_belong_together(tmp_path, test_shape, message):
    folder = tmp_path / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_idx(folder / mnist.FILES[0], rng.integers(0, 256, (40, 28, 28)))
    write_idx(folder / mnist.FILES[1], rng.integers(0, 10, 40))
    write_idx(folder / mnist.FILES[2], rng.integers(0, 256, test_shape))
    write_idx(folder / mnist.FILES[3], rng.integers(0, 10, test_shape[0]))
    with pytest.raises(KdistillError, match=message) as caught:
        load_data("mnist", root=str(tmp_path), val_size=10, download=False)
    assert one_line(caught).startswith("mnist: ")


# --- digest -------------------------------------------------------------------------------------

def test_digest_is_a_function_of_the_data():
    splits = load_data("digits", val_size=300)
    digest = splits.digest()
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert load_data("digits", val_size=300).digest() == digest  # loaded again
    assert load_data("digits", val_size=300, split_seed=1).digest() != digest  # other split

    splits.test.images[7, 0, 3, 4] ^= 1  # one pixel, one bit
    assert splits.digest() != digest
    splits.test.images[7, 0, 3, 4] ^= 1
    assert splits.digest() == digest
    splits.val.labels[0] = (splits.val.labels[0] + 1) % 10
    assert splits.digest() != digest


def test_digest_covers_the_class_names():
    splits = load_data("digits", val_size=300)
    digest = splits.digest()
    splits.classes[0] = "zero"
    assert splits.digest() != digest


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} not installed")
def test_digest_of_fashion_mnist_is_cheap():
    splits = load_data("fashion_mnist", download=False)
    start = time.perf_counter()
    splits.digest()
    assert time.perf_counter() - start < 1.0  # about 0.04 s on a 2-core CPU
