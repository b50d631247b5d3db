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

    train_full, test, classes = DATASETS[name].loader(Path(root).expanduser() if root else None, download)
    if val_size >= len(train_full):
        raise KdistillError(f"val_size={val_size} leaves no training data: {name} has {len(train_full)} "
                            f"training samples; use a smaller val_size")
    for split, images in (("train", train_full), ("test", test)):
        if len(images) and not 0 <= int(images.labels.min()) <= int(images.labels.max()) < len(classes):
            raise KdistillError(f"{name}: {split} labels fall outside 0..{len(classes) - 1}; "
                                "the label file is corrupt, delete it and download it again")

    order = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(split_seed))
    # Sorted so each split keeps the source order (better memory locality, easier to eyeball).
    val = train_full.subset(order[:val_size].sort().values)
    train = train_full.subset(order[val_size:].sort().values)
    mean, std = channel_stats(train.images)
    return DataSplits(name, train, val, test, list(classes), mean, std)
