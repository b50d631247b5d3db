"""CIFAR-10 and CIFAR-100 from the official Python archives, read without running pickled code.

The archives (https://www.cs.toronto.edu/~kriz/cifar.html) are Python pickles of dicts holding
numpy arrays. `pickle.load` would run whatever a crafted file asks for, so the files are read
by `PlainDataUnpickler`, which rebuilds containers, strings, numbers and numpy arrays and
refuses every other global: a file that names one is not an official archive.
"""

import io
import pickle
import tarfile
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import numpy as np
import torch

from kdistill.data.download import fetch
from kdistill.data.registry import DataRequest, LoadedData, register_dataset
from kdistill.data.sets import ImageSet
from kdistill.errors import KdistillError

# What numpy's pickles of plain arrays need (numpy 1.x and 2.x module names), and nothing else.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
}


class PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays; any other global stops with a KdistillError naming it."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # the archives were written by Python 2
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise KdistillError(f"{self.path} holds a pickle of something other than plain data ({module}.{name}); "
                            "it is not an official CIFAR archive: delete it and download it again")


def read_plain_pickle(path: Path) -> object:
    try:
        with open(path, "rb") as handle:
            return PlainDataUnpickler(io.BytesIO(handle.read()), path).load()
    except KdistillError:
        raise
    except Exception as error:  # truncated or not a pickle at all
        raise KdistillError(f"{path} is not a readable CIFAR archive file ({type(error).__name__}: {error}); "
                            "delete it and download it again") from None


@dataclass(frozen=True)
class CifarArchive:
    name: str
    folder: str  # what the tar.gz unpacks to
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int

    def load(self, request: DataRequest) -> LoadedData:
        folder = self._locate(request)
        classes = self._class_names(folder / self.meta_file)
        train = [self._read_batch(folder / file) for file in self.train_files]
        test = self._read_batch(folder / self.test_file)
        train_set = ImageSet(torch.cat([images for images, _ in train]), torch.cat([labels for _, labels in train]))
        sources = [str(folder / file) for file in (*self.train_files, self.test_file, self.meta_file)]
        return LoadedData(train_set, ImageSet(*test), classes, sources)

    def _locate(self, request: DataRequest) -> Path:
        place = request.place
        looked = [place / self.folder, place]
        for folder in looked:
            if (folder / self.test_file).is_file():
                return folder
        target = place / self.folder
        fix = f"put the official archive's {self.folder}/ folder in {place}"
        if not request.download:
            raise KdistillError(f"{self.name}: not found in {', '.join(map(str, looked))} and download is off; {fix}")
        archive = place / f"{self.folder}.tar.gz"
        try:
            fetch(self.url, archive, self.md5)
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers() if m.name.split("/")[0] == self.folder]
                tar.extractall(place, members=members, filter="data")
        except (OSError, HTTPException, tarfile.TarError) as error:
            raise KdistillError(f"{self.name}: not found in {place} and download failed ({error}); {fix}") from error
        finally:
            archive.unlink(missing_ok=True)
        return target

    def _class_names(self, path: Path) -> list[str]:
        meta = _as_dict(read_plain_pickle(path), path)
        names = meta.get(self.names_key)
        if not isinstance(names, list) or len(names) != self.num_classes or not all(
                isinstance(n, bytes | str) for n in names):
            raise KdistillError(f"{path} does not list {self.num_classes} class names under {self.names_key!r}; "
                                "replace it with the official file")
        return [n.decode() if isinstance(n, bytes) else n for n in names]

    def _read_batch(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        batch = _as_dict(read_plain_pickle(path), path)
        data, labels = batch.get(b"data"), batch.get(self.label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            shape = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
            raise KdistillError(f"{path}: 'data' must be uint8 [N, 3072] (32x32 RGB images), got {shape}; "
                                "replace it with the official file")
        labels = np.asarray(labels) if isinstance(labels, list | np.ndarray) else None
        if labels is None or labels.ndim != 1 or len(labels) != len(data) or labels.dtype.kind not in "iu":
            raise KdistillError(f"{path}: {self.label_key.decode()!r} must hold {len(data)} integer labels; "
                                "replace it with the official file")
        if len(labels) and not 0 <= labels.min() <= labels.max() < self.num_classes:
            raise KdistillError(f"{path}: labels fall outside 0..{self.num_classes - 1}; "
                                "replace it with the official file")
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # rows are R plane, G plane, B plane
        return images, torch.from_numpy(labels.astype(np.int64))


def _as_dict(value: object, path: Path) -> dict:
    if not isinstance(value, dict):
        raise KdistillError(f"{path} holds a {type(value).__name__}, not the dict of an official CIFAR file; "
                            "replace it with the official file")
    # Keys are bytes in the official files; accept str keys from re-pickled copies too.
    return {key.encode() if isinstance(key, str) else key: item for key, item in value.items()}


CIFAR10 = CifarArchive(
    name="cifar10", folder="cifar-10-batches-py", url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a", train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch", meta_file="batches.meta", label_key=b"labels", names_key=b"label_names",
    num_classes=10)
CIFAR100 = CifarArchive(
    name="cifar100", folder="cifar-100-python", url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85", train_files=("train",), test_file="test", meta_file="meta",
    label_key=b"fine_labels", names_key=b"fine_label_names", num_classes=100)


@register_dataset("cifar10", "CIFAR-10: 32x32 colour photos, 10 classes, 50k train / 10k test (official archive)")
def load_cifar10(request: DataRequest) -> LoadedData:
    return CIFAR10.load(request)


@register_dataset("cifar100", "CIFAR-100: 32x32 colour photos, 100 classes, 50k train / 10k test (official archive)")
def load_cifar100(request: DataRequest) -> LoadedData:
    return CIFAR100.load(request)
