"""Registry of data sets by name, and `load_data`, which splits one into train/val/test.

A data set is a loader function registered under a name:

    @register_dataset("my_set", "one line: what it holds")
    def load_my_set(request: DataRequest) -> LoadedData:
        return LoadedData(train, test, class_names, sources=[str(path)])

`request` says where to look (`root`), whether downloading is allowed, and the image shape the
user asked for; a loader may honour `channels` and `image_size` itself (cheaper while decoding),
otherwise `load_data` converts the uint8 tensors afterwards.
"""

import difflib
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kdistill.data.sets import DataSplits, ImageSet, channel_stats
from kdistill.errors import KdistillError

DEFAULT_ROOT = Path("~/.cache/kdistill/data").expanduser()
MAX_DEFAULT_VAL = 5000  # a fractional val_size is capped here: 5,000 images measure accuracy to about 0.4 points


@dataclass(frozen=True)
class DataRequest:
    """What `load_data` asks a loader for."""

    root: Path | None = None  # data.root as the user gave it (it exists); None = the loader's default places
    download: bool = True  # may the loader download what it does not find?
    channels: int | None = None  # 1 (greyscale) or 3 (RGB); None = as stored
    image_size: int | None = None  # square side in pixels; None = as stored
    test_size: int | float = 0.2  # for a data set without a test split: a count or a fraction, carved with a fixed seed

    @property
    def place(self) -> Path:
        """Where to look for, and download into: data.root, else ~/.cache/kdistill/data."""
        return self.root or DEFAULT_ROOT


@dataclass
class LoadedData:
    """A loader's answer: the full training split, the test split, class names, and the files read."""

    train: ImageSet
    test: ImageSet
    classes: Sequence[str]
    sources: list[str] = field(default_factory=list)


Loader = Callable[[DataRequest], LoadedData]


class DatasetInfo(NamedTuple):
    loader: Loader
    description: str


DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(name: str, description: str) -> Callable[[Loader], Loader]:
    """Decorator that adds a loader `fn(request: DataRequest) -> LoadedData` to `DATASETS` under `name`."""
    def add(loader: Loader) -> Loader:
        if name in DATASETS:
            raise KdistillError(f"data set {name!r} is already registered; pick another name")
        DATASETS[name] = DatasetInfo(loader, description)
        return loader
    return add


def load_data(name: str, root: str | Path | None = None, val_size: int | float = 0.1, split_seed: int = 0,
              download: bool = True, *, channels: int | None = None, image_size: int | None = None,
              test_size: int | float = 0.2, max_val_size: int | None = MAX_DEFAULT_VAL) -> DataSplits:
    """Load data set `name` and carve a validation split off its training set.

    `val_size` is a count, or a fraction of the training set (capped at `max_val_size`). The carve
    is a permutation drawn from a generator seeded with `split_seed`, so the same seed always
    gives the same split. `channels` and `image_size` convert every image (1 or 3 channels, a
    square side in pixels). `mean`/`std` describe the remaining train split.
    """
    name = _registered_name(name)
    if name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        close = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise KdistillError(f"unknown data set {name!r}; {hint}registered data sets: {known}")
    _check_size(val_size, "val_size")
    _check_size(test_size, "test_size")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise KdistillError(f"split_seed must be a non-negative integer, got {split_seed!r}")
    if channels not in (None, 1, 3):
        raise KdistillError(f"channels must be 1 (greyscale), 3 (RGB) or null (as stored), got {channels!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or not 1 <= image_size <= 4096):
        raise KdistillError(f"image_size must be a side in pixels from 1 to 4096, or null (as stored), "
                            f"got {image_size!r}")
    if root is not None:
        root = Path(root).expanduser()
        if not root.exists():
            raise KdistillError(f"data.root: {root} does not exist; give the folder (or file) that holds the data, "
                                "or leave data.root unset to use the default places")

    request = DataRequest(root, download, channels, image_size, test_size)
    loaded = _check_loaded(name, DATASETS[name].loader(request))
    train_full = convert(loaded.train, channels, image_size)
    test = convert(loaded.test, channels, image_size)
    count = split_count(val_size, len(train_full), max_val_size)
    if count >= len(train_full):
        raise KdistillError(f"data.val_size={val_size} asks for {count} validation images but {name} has only "
                            f"{len(train_full)} training images; use a smaller val_size (a count, or a fraction "
                            "such as 0.1)")

    order = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(split_seed))
    # Sorted so each split keeps the source order (better memory locality, easier to eyeball).
    val = train_full.subset(order[:count].sort().values)
    train = train_full.subset(order[count:].sort().values)
    mean, std = channel_stats(train.images)
    return DataSplits(name, train, val, test, list(loaded.classes), mean, std, sources=list(loaded.sources))


def _registered_name(name: str) -> str:
    """`module.path:name` imports the module (which registers data set `name`) and gives `name`.

    Only a name registered by `register_dataset` is then used: nothing the recipe names is called.
    """
    if ":" not in name:
        return name
    module, _, registered = name.partition(":")
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise KdistillError(f"data set {name!r}: cannot import {module} ({error}); is it on PYTHONPATH?") from error
    except Exception as error:  # the module's top-level code failed
        raise KdistillError(f"data set {name!r}: importing {module} failed ({type(error).__name__}: {error}); "
                            "fix the module") from error
    if registered not in DATASETS:
        raise KdistillError(f"data set {name!r}: importing {module} registered no data set {registered!r}; "
                            f"decorate its loader with @register_dataset({registered!r}, ...)")
    return registered


def split_count(size: int | float, total: int, cap: int | None = None) -> int:
    """How many of `total` samples a `size` asks for: an int is a count; a float in (0, 1) a fraction
    (at least 1, at most `cap`)."""
    if isinstance(size, float):
        count = max(1, round(size * total))
        return min(count, cap) if cap else count
    return size


def _check_size(size: object, key: str) -> None:
    count = isinstance(size, int) and not isinstance(size, bool) and size >= 1
    fraction = isinstance(size, float) and 0 < size < 1
    if not (count or fraction):
        raise KdistillError(f"{key} must be a count (a positive integer) or a fraction between 0 and 1, "
                            f"got {size!r}")


def convert(data: ImageSet, channels: int | None, image_size: int | None) -> ImageSet:
    """`data` with `channels` channels and `image_size` x `image_size` pixels (None: as it is).

    Greyscale becomes RGB by repeating the channel; RGB becomes greyscale with ITU-R 601 luma
    weights (as Pillow's "L" mode); resizing is bilinear with antialiasing, in chunks so the float
    copy stays small.
    """
    images = data.images
    have = images.shape[1]
    if channels is not None and have != channels:
        if (have, channels) == (1, 3):
            images = images.expand(-1, 3, -1, -1).contiguous()
        elif (have, channels) == (3, 1):
            weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
            images = _chunked(images, lambda x: (x * weights).sum(1, keepdim=True))
        else:
            raise KdistillError(f"cannot convert {have}-channel images to {channels} channels; set data.channels "
                                f"to null (keep {have})")
    if image_size is not None and tuple(images.shape[2:]) != (image_size, image_size):
        size = (image_size, image_size)
        images = _chunked(images, lambda x: F.interpolate(x, size=size, mode="bilinear", antialias=True,
                                                          align_corners=False))
    return data if images is data.images else ImageSet(images, data.labels)


def _chunked(images: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], chunk: int = 2048) -> torch.Tensor:
    """uint8 -> float -> fn -> rounded uint8, `chunk` images at a time."""
    parts = [fn(images[i:i + chunk].float()).round_().clamp_(0, 255).to(torch.uint8)
             for i in range(0, len(images), chunk)]
    return torch.cat(parts) if parts else images


def _check_loaded(name: str, loaded: object) -> LoadedData:
    """The loader's answer, checked now so bad data fails before training, not after it.

    A plain (train, test, classes) tuple is accepted too, for loaders that read no files.
    """
    if isinstance(loaded, tuple | list) and len(loaded) == 3:
        loaded = LoadedData(*loaded)
    if not isinstance(loaded, LoadedData):
        raise KdistillError(f"data set {name!r}: its loader must return LoadedData(train, test, classes, sources) "
                            f"or (train ImageSet, test ImageSet, class names), got {type(loaded).__name__}")
    train, test, classes = loaded.train, loaded.test, loaded.classes
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
    if isinstance(loaded.sources, str) or not all(isinstance(source, str) for source in loaded.sources):
        raise KdistillError(f"data set {name!r}: sources must be a list of strings (the files read), "
                            f"got {loaded.sources!r}")
    return loaded
