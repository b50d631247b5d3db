"""Tests for kdistill.data: IDX reading, data set loading and splitting, batching, augmentation.

Nothing here touches the network: `no_network` replaces urlopen for every test.
"""

import gzip
import hashlib
import io
import re
import struct
from dataclasses import replace
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdistill.data import (
    DATASETS,
    Augment,
    BatchLoader,
    DataRequest,
    ImageSet,
    download,
    load_data,
    mnist,
    register_dataset,
)
from kdistill.data.idx import read_idx
from kdistill.data.registry import convert
from kdistill.errors import KdistillError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = mnist.FILES


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")
    monkeypatch.setattr(download, "urlopen", refuse)


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file, gzipped when the name ends in .gz."""
    data = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_fake_mnist(directory: Path, n_train: int = 40, n_test: int = 10, gz: bool = True) -> None:
    """The four IDX files of an MNIST-format data set, with random 28x28 images."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for name, n in ((IDX_FILES[0], n_train), (IDX_FILES[2], n_test)):
        write_idx(directory / f"{name}{suffix}", rng.integers(0, 256, (n, 28, 28)))
    for name, n in ((IDX_FILES[1], n_train), (IDX_FILES[3], n_test)):
        write_idx(directory / f"{name}{suffix}", rng.integers(0, 10, n))


def image_hashes(images: torch.Tensor) -> torch.Tensor:
    """One number per image, so splits can be compared as multisets of contents."""
    return torch.tensor([hash(row.tobytes()) for row in images.reshape(len(images), -1).numpy()])


def assert_partition(parts: list[ImageSet], whole: ImageSet) -> None:
    """The parts together hold exactly the samples of `whole`: no overlap, nothing lost."""
    joined = torch.cat([image_hashes(p.images) for p in parts]).sort().values
    assert torch.equal(joined, image_hashes(whole.images).sort().values)


def fake_set(n: int = 50, channels: int = 1, size: int = 8, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (n,), generator=g))


# --- IDX files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, name):
    array = np.random.default_rng(1).integers(0, 256, (5, 3, 4))
    tensor = read_idx(write_idx(tmp_path / name, array))
    assert tensor.dtype == torch.uint8 and tensor.shape == (5, 3, 4)
    assert np.array_equal(tensor.numpy(), array)
    tensor += 1  # owns writable memory


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _bad_magic(path: Path) -> None:
    path.write_bytes(b"\x01\x02" + path.read_bytes()[2:])


def _trailing_bytes(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"junk")


@pytest.mark.parametrize("damage", [_truncate, _bad_magic, _trailing_bytes])
@pytest.mark.parametrize("name", ["labels-idx1-ubyte", "labels-idx1-ubyte.gz"])
def test_damaged_idx_names_the_file(tmp_path, name, damage):
    path = write_idx(tmp_path / name, np.arange(100) % 10)
    if path.suffix == ".gz":  # damage the decompressed content, as a bad download of the raw file would
        raw = tmp_path / "raw"
        raw.write_bytes(gzip.decompress(path.read_bytes()))
        damage(raw)
        path.write_bytes(gzip.compress(raw.read_bytes()))
    else:
        damage(path)
    with pytest.raises(KdistillError, match=name):
        read_idx(path)


def test_truncated_gzip_names_the_file(tmp_path):
    path = write_idx(tmp_path / "x-idx1-ubyte.gz", np.arange(1000) % 10)
    _truncate(path)
    with pytest.raises(KdistillError, match="x-idx1-ubyte.gz.*download"):
        read_idx(path)


# --- load_data ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fashion():
    if not FASHION_DIR.is_dir():
        pytest.skip(f"{FASHION_DIR} not installed")
    return load_data("fashion_mnist", download=False)


def test_fashion_mnist_splits(fashion):
    assert (len(fashion.train), len(fashion.val), len(fashion.test)) == (55000, 5000, 10000)
    assert fashion.input_shape == (1, 28, 28) and fashion.num_classes == 10
    assert fashion.classes[0] == "T-shirt/top" and fashion.classes[9] == "Ankle boot"
    for split in (fashion.train, fashion.val, fashion.test):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.labels.min() >= 0 and split.labels.max() <= 9
    # Published Fashion-MNIST statistics are about 0.286 / 0.353.
    assert fashion.mean[0] == pytest.approx(0.286, abs=0.005)
    assert fashion.std[0] == pytest.approx(0.353, abs=0.005)


def test_fashion_mnist_split_is_seeded_partition(fashion):
    full_train = DATASETS["fashion_mnist"].loader(DataRequest(download=False)).train
    assert_partition([fashion.train, fashion.val], full_train)
    same = load_data("fashion_mnist", split_seed=0, download=False)
    assert torch.equal(same.val.images, fashion.val.images)
    other = load_data("fashion_mnist", split_seed=1, download=False)
    assert not torch.equal(other.val.labels, fashion.val.labels)
    assert_partition([other.train, other.val], full_train)


@pytest.mark.parametrize("subdir", ["mnist", "."])
def test_load_from_root(tmp_path, subdir):
    write_fake_mnist(tmp_path / subdir, gz=subdir == ".")
    splits = load_data("mnist", root=str(tmp_path), val_size=10, download=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 10)
    assert splits.input_shape == (1, 28, 28) and splits.classes == [str(d) for d in range(10)]
    assert 0.4 < splits.mean[0] < 0.6  # uniform random pixels


def test_mismatched_idx_files(tmp_path):
    write_fake_mnist(tmp_path / "mnist", gz=False)
    write_idx(tmp_path / "mnist" / IDX_FILES[3], np.zeros(9))  # one label short
    with pytest.raises(KdistillError, match="t10k-images-idx3-ubyte .*t10k-labels-idx1-ubyte .*not matching"):
        load_data("mnist", root=str(tmp_path), val_size=10, download=False)


def test_missing_data_set_without_download_says_where_it_looked(tmp_path):
    looked = f"kmnist: not found in {tmp_path}/kmnist, {tmp_path} and download is off"
    with pytest.raises(KdistillError, match=re.escape(looked)):
        load_data("kmnist", root=str(tmp_path), download=False)


def test_failed_download_explains_the_fix(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise URLError("no route to host")
    monkeypatch.setattr(download, "urlopen", offline)
    monkeypatch.setattr(mnist, "FASHION_MNIST", replace(mnist.FASHION_MNIST, system_dirs=()))
    with pytest.raises(KdistillError) as caught:
        load_data("fashion_mnist", root=str(tmp_path))
    message = str(caught.value)
    assert "download failed" in message and "no route to host" in message
    assert "apt-get install dataset-fashion-mnist" in message and f"{tmp_path}/fashion_mnist/" in message
    assert not list((tmp_path / "fashion_mnist").iterdir())  # no partial files left behind


def test_fetch_checks_md5(tmp_path, monkeypatch):
    payload = b"idx bytes"
    monkeypatch.setattr(download, "urlopen", lambda url, timeout: io.BytesIO(payload))
    dest = tmp_path / "sub" / "file.gz"
    with pytest.raises(KdistillError, match="checksum mismatch"):
        download.fetch("http://mirror/file.gz", dest, md5="0" * 32)
    assert not list(dest.parent.iterdir())
    download.fetch("http://mirror/file.gz", dest, md5=hashlib.md5(payload).hexdigest())
    assert dest.read_bytes() == payload and list(dest.parent.iterdir()) == [dest]


def test_digits():
    from sklearn.datasets import load_digits

    splits = load_data("digits", val_size=300)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1200, 300, 297)
    assert splits.input_shape == (1, 8, 8) and splits.train.images.max() == 255
    everything = load_digits()
    whole = ImageSet(torch.from_numpy(everything.images).mul(255 / 16).round().to(torch.uint8).unsqueeze(1),
                     torch.from_numpy(everything.target).long())
    assert_partition([splits.train, splits.val, splits.test], whole)
    # The test split does not depend on split_seed.
    assert torch.equal(load_data("digits", val_size=300, split_seed=7).test.images, splits.test.images)


def test_unknown_name_suggests_closest():
    with pytest.raises(KdistillError, match="did you mean 'fashion_mnist'.*digits, fashion_mnist, image_folder, "
                                            "kmnist, mnist, npz"):
        load_data("fashion-mnist")


@pytest.mark.parametrize("val_size", [0, 1500, -3, 2.5])
def test_bad_val_size(val_size):
    with pytest.raises(KdistillError, match="val_size"):
        load_data("digits", val_size=val_size)


def test_val_size_is_a_count_or_a_capped_fraction():
    assert len(load_data("digits", val_size=0.1).val) == 150  # 10 % of 1,500
    assert len(load_data("digits", val_size=0.1, max_val_size=100).val) == 100
    assert len(load_data("digits", val_size=0.5, max_val_size=None).val) == 750
    assert len(load_data("digits", val_size=42).val) == 42
    with pytest.raises(KdistillError, match="val_size=2000 asks for 2000 validation images but digits has only 1500"):
        load_data("digits", val_size=2000)


def test_a_root_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(KdistillError, match=f"data.root: {tmp_path}/nowhere does not exist"):
        load_data("fashion_mnist", root=str(tmp_path / "nowhere"), download=False)


def test_a_root_is_the_only_place_looked(tmp_path):
    """An empty data.root must not fall back to the system's copy: the user named where the data is."""
    with pytest.raises(KdistillError, match=f"not found in {tmp_path}/fashion_mnist, {tmp_path} and download is off"):
        load_data("fashion_mnist", root=str(tmp_path), download=False)


def test_the_splits_say_where_they_came_from(tmp_path):
    write_fake_mnist(tmp_path / "mnist", gz=False)
    splits = load_data("mnist", root=str(tmp_path), val_size=10, download=False)
    assert splits.sources == [str(tmp_path / "mnist" / name) for name in IDX_FILES]
    summary = splits.summary()
    assert summary["sizes"] == {"train": 30, "val": 10, "test": 10}
    assert summary["input_shape"] == [1, 28, 28] and summary["num_classes"] == 10
    line = splits.describe()
    assert line.startswith("mnist: 30 train / 10 val / 10 test, 1x28x28, 10 classes, from ")
    assert "and 2 more" in line
    assert "scikit-learn" in load_data("digits").describe()


def test_channels_and_image_size_convert_every_split():
    grey = load_data("digits", val_size=100)
    rgb = load_data("digits", val_size=100, channels=3, image_size=16)
    assert rgb.input_shape == (3, 16, 16) and rgb.test.images.shape[1:] == (3, 16, 16)
    assert torch.equal(rgb.train.images[:, 0], rgb.train.images[:, 2])  # grey repeated
    assert torch.equal(rgb.train.labels, grey.train.labels)
    # A uniform image stays uniform through the resize; RGB -> grey uses luma weights.
    flat = ImageSet(torch.full((2, 3, 4, 4), 200, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    assert torch.all(convert(flat, 1, 9).images == 200) and convert(flat, 1, 9).images.shape == (2, 1, 9, 9)
    red = ImageSet(torch.zeros(1, 3, 2, 2, dtype=torch.uint8).index_fill_(1, torch.tensor([0]), 255),
                   torch.zeros(1, dtype=torch.long))
    assert torch.all(convert(red, 1, None).images == 76)  # round(0.299 * 255)
    assert convert(flat, None, None) is flat


@pytest.mark.parametrize("option, value, message", [
    ("channels", 2, "channels must be 1 .*, 3 .* or null"), ("image_size", 0, "image_size must be"),
    ("val_size", 1.0, "val_size must be a count"), ("test_size", -0.5, "test_size must be a count")])
def test_bad_shape_options(option, value, message):
    with pytest.raises(KdistillError, match=message):
        load_data("digits", **{option: value})


def test_a_data_set_registered_by_a_module_named_in_the_recipe(tmp_path, monkeypatch):
    (tmp_path / "my_scans.py").write_text(
        "import torch\n"
        "from kdistill.data import ImageSet, LoadedData, register_dataset\n"
        "@register_dataset('my_scans', 'test data')\n"
        "def load(request):\n"
        "    data = ImageSet(torch.zeros(20, 1, 4, 4, dtype=torch.uint8), torch.arange(20) % 2)\n"
        "    return LoadedData(data, data, ['a', 'b'], sources=['made up'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        splits = load_data("my_scans:my_scans", val_size=5)
        assert splits.name == "my_scans" and len(splits.train) == 15 and splits.sources == ["made up"]
        with pytest.raises(KdistillError, match="registered no data set 'other'"):
            load_data("my_scans:other")
        with pytest.raises(KdistillError, match="cannot import no_such_module"):
            load_data("no_such_module:x")
    finally:
        DATASETS.pop("my_scans", None)


def test_registered_loader_is_checked():
    @register_dataset("test_bad_labels", "labels outside the class list")
    def bad(request):
        data = fake_set(20)
        return data, data, ["a", "b"]
    try:
        assert DATASETS["test_bad_labels"].description == "labels outside the class list"
        with pytest.raises(KdistillError, match="labels fall outside 0..1"):
            load_data("test_bad_labels", val_size=5)
        with pytest.raises(KdistillError, match="already registered"):
            register_dataset("test_bad_labels", "again")(bad)
    finally:
        DATASETS.pop("test_bad_labels")


# --- BatchLoader -------------------------------------------------------------------------------

def epoch_batches(loader: BatchLoader, epoch: int) -> list:
    loader.set_epoch(epoch)
    return list(loader)


def test_shuffled_epoch_covers_every_sample_once():
    data = fake_set(50)
    loader = BatchLoader(data, 16, mean=(0.5,), std=(0.25,), shuffle=True)
    batches = epoch_batches(loader, 0)
    assert len(batches) == len(loader) == 4 and loader.num_samples == 50
    seen = torch.cat([b.index for b in batches])
    assert sorted(seen.tolist()) == list(range(50)) and not torch.equal(seen, torch.arange(50))
    for b in batches:
        assert torch.equal(b.labels, data.labels[b.index])
        assert torch.allclose(b.inputs, (data.images[b.index] / 255 - 0.5) / 0.25, atol=1e-5)


def test_drop_last_and_unshuffled_order():
    loader = BatchLoader(fake_set(50), 16, mean=(0.5,), std=(0.25,), drop_last=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 3 and loader.num_samples == 48
    assert torch.equal(torch.cat([b.index for b in batches]), torch.arange(48))


@pytest.mark.parametrize("augment", [None, Augment(crop_padding=2, hflip=True)])
def test_batches_are_a_function_of_seed_and_epoch(augment):
    def make(seed=3):
        return BatchLoader(fake_set(50), 8, mean=(0.5,), std=(0.25,), shuffle=True, augment=augment, seed=seed)
    run = make()
    first = [epoch_batches(run, e) for e in range(3)]
    resumed = make()  # e.g. a run restarted at epoch 2
    for again, original in zip(epoch_batches(resumed, 2), first[2], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(again, original, strict=True))
    assert not torch.equal(first[0][0].index, first[1][0].index)
    assert not torch.equal(epoch_batches(make(seed=4), 0)[0].index, first[0][0].index)


def test_normalised_train_split_is_standard():
    splits = load_data("digits", val_size=300)
    loader = BatchLoader(splits.train, 256, mean=splits.mean, std=splits.std)
    inputs = torch.cat([b.inputs for b in loader])
    assert inputs.dtype == torch.float32
    assert inputs.mean().item() == pytest.approx(0, abs=1e-4)
    assert inputs.std().item() == pytest.approx(1, abs=1e-3)


def test_preprocessing_signature():
    data = fake_set(10)
    plain = BatchLoader(data, 4, mean=(0.5,), std=(0.25,))
    assert plain.preprocessing == BatchLoader(data, 8, mean=[0.5], std=[0.25], augment=Augment()).preprocessing
    assert plain.preprocessing != BatchLoader(data, 4, mean=(0.5,), std=(0.3,)).preprocessing
    assert plain.preprocessing != BatchLoader(data, 4, mean=(0.5,), std=(0.25,),
                                              augment=Augment(hflip=True)).preprocessing


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"mean": (0.5, 0.5)}, {"std": (0.0,)}, {"seed": -1}])
def test_bad_loader_arguments(kwargs):
    args = {"batch_size": 4, "mean": (0.5,), "std": (0.25,)} | kwargs
    with pytest.raises(KdistillError):
        BatchLoader(fake_set(10), args.pop("batch_size"), **args)


# --- Augment -----------------------------------------------------------------------------------

def test_disabled_augment_is_identity():
    x = torch.rand(4, 1, 6, 6)
    assert not Augment().enabled
    assert Augment()(x, torch.Generator()) is x


def test_hflip_mirrors_the_flipped_samples_only():
    x = torch.rand(64, 2, 5, 7)
    out = Augment(hflip=True)(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, s.flip(-1)) for o, s in zip(out, x, strict=True)])
    unchanged = torch.tensor([torch.equal(o, s) for o, s in zip(out, x, strict=True)])
    assert torch.all(flipped ^ unchanged) and 10 < flipped.sum() < 54


@pytest.mark.parametrize("flips", [(False, False), (True, False), (True, True)])
def test_crop_matches_naive_per_sample_loop(flips):
    x, p = torch.rand(32, 3, 6, 5), 2
    augment = Augment(crop_padding=p, hflip=flips[0], vflip=flips[1])
    draws = augment.draw(32, torch.Generator().manual_seed(5))
    out = augment.apply(x, draws)
    assert out.shape == x.shape
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(5)))  # the same draws, drawn inside

    no = torch.zeros(32, dtype=torch.bool)
    hflip, vflip = (no if f is None else f for f in (draws.get("hflip"), draws.get("vflip")))
    dy, dx = draws.get("offsets").T
    padded = F.pad(x, (p, p, p, p))
    for i in range(32):
        source = padded[i].flip(-1) if hflip[i] else padded[i]
        source = source.flip(-2) if vflip[i] else source
        assert torch.equal(out[i], source[:, dy[i]:dy[i] + 6, dx[i]:dx[i] + 5])
    assert len(set(zip(dy.tolist(), dx.tolist(), strict=True))) > 5
    assert 5 < hflip.sum() < 27 if flips[0] else not hflip.any()


@pytest.mark.parametrize("kwargs", [{"crop_padding": -1}, {"crop_padding": 1.5}, {"hflip": "yes"}])
def test_bad_augment_arguments(kwargs):
    with pytest.raises(KdistillError):
        Augment(**kwargs)
