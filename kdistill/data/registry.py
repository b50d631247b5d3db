"""Registry of data sets by name, and `load_data`, which splits one into train/val/test."""

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from kdistill.data.sets import DataSplits, ImageSet, channel_stats
from kdistill.errors import KdistillError

# fn(root, download) -> (full training set, test set, class names)
Loader = Callable[[Path | None, bool], tuple[ImageSet, ImageSet, list[str]]]


class DatasetInfo(NamedTuple):
    loader: Loader
    description: str


DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(name: str, description: str) -> Callable[[Loader], Loader]:
    """Decorator that adds a loader to `DATASETS` under `name`."""
    def add(loader: Loader) -> Loader:
        if name in DATASETS:
            raise KdistillError(f"data set {name!r} is already registered; pick another name")
        DATASETS[name] = DatasetInfo(loader, description)
        return loader
    return add


def load_data(name: str, root: str | None = None, val_size: int = 5000, split_seed: int = 0,
              download: bool = True) -> DataSplits:
    """Load data set `name` and carve `val_size` random training samples off as the validation split.

    The carve is a permutation drawn from a generator seeded with `split_seed`, so the same
    seed always gives the same split. `mean`/`std` describe the remaining train split.
    """
    if name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        close = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise KdistillError(f"unknown data set {name!r}; {hint}registered data sets: {known}")
    if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 1:
        raise KdistillError(f"val_size must be a positive integer, got {val_size!r}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise KdistillError(f"split_seed must be a non-negative integer, got {split_seed!r}")

    loaded = DATASETS[name].loader(Path(root).expanduser() if root else None, download)
    train_full, test, classes = _check_loaded(name, loaded)
    if val_size >= len(train_full):
        raise KdistillError(f"val_size={val_size} leaves no training data: {name} has {len(train_full)} "
                            f"training samples; use a smaller val_size")

    order = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(split_seed))
    # Sorted so each split keeps the source order (better memory locality, easier to eyeball).
    val = train_full.subset(order[:val_size].sort().values)
    train = train_full.subset(order[val_size:].sort().values)
    mean, std = channel_stats(train.images)
    return DataSplits(name, train, val, test, list(classes), mean, std)


def _check_loaded(name: str, loaded: object) -> tuple[ImageSet, ImageSet, list[str]]:
    """The loader's (train, test, classes), checked now so bad data fails before training, not after it."""
    if not isinstance(loaded, tuple | list) or len(loaded) != 3:
        raise KdistillError(f"data set {name!r}: its loader must return (train ImageSet, test ImageSet, class names), "
                            f"got {type(loaded).__name__}")
    train, test, classes = loaded
    for split, data in (("train", train), ("test", test)):
        if not isinstance(data, ImageSet):
            raise KdistillError(f"data set {name!r}: its loader returned a {type(data).__name__} as the {split} split; "
                                "wrap images and labels in kdistill.data.ImageSet")
    if isinstance(classes, str) or not isinstance(classes, tuple | list) or not all(
            isinstance(c, str) for c in classes):
        raise KdistillError(f"data set {name!r}: class names must be a list of strings, got {classes!r}")
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise KdistillError(f"data set {name!r}: needs at least two distinct class names, got {list(classes)}")
    if not len(test):
        raise KdistillError(f"{name}: the test split is empty; the test files are damaged or empty, "
                            "replace them with the original files")
    shape, test_shape = tuple(train.images.shape[1:]), tuple(test.images.shape[1:])
    if 0 in shape:
        raise KdistillError(f"{name}: images of shape (C, H, W) = {shape} have no pixels; replace the image files")
    if test_shape != shape:
        raise KdistillError(f"{name}: test images are (C, H, W) = {test_shape} but training images are {shape}; "
                            "the files come from different data sets, replace them with the original files")
    for split, data in (("train", train), ("test", test)):
        if len(data) and not 0 <= int(data.labels.min()) <= int(data.labels.max()) < len(classes):
            raise KdistillError(f"{name}: {split} labels fall outside 0..{len(classes) - 1}; "
                                "the label file is corrupt, delete it and download it again")
    return train, test, list(classes)
