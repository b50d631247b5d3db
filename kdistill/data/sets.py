"""In-memory image sets and the train/val/test bundle that `load_data` returns."""

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch

from kdistill.errors import KdistillError

# The label of a sample whose class is withheld (the unlabelled pool): what F.cross_entropy ignores.
UNLABELLED = -100


@dataclass
class ImageSet:
    """One split held wholly in memory: uint8 images [N, C, H, W] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        # Loaders can be registered by users, so check the contract once here rather than on the hot path.
        for name, value in (("images", self.images), ("labels", self.labels)):
            if not isinstance(value, torch.Tensor):
                raise KdistillError(f"ImageSet {name} must be a torch.Tensor, got {type(value).__name__}; "
                                    "convert them in the data set loader (torch.from_numpy)")
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise KdistillError(f"ImageSet images must be uint8 [N, C, H, W], got {self.images.dtype} "
                                f"{list(self.images.shape)}; convert them in the data set loader")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise KdistillError(f"ImageSet labels must be int64 [{len(self.images)}], got {self.labels.dtype} "
                                f"{list(self.labels.shape)}; convert them in the data set loader")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        """The samples at `index`, copied."""
        return ImageSet(self.images[index], self.labels[index])


@dataclass
class DataSplits:
    """A data set split three ways, with the train split's per-channel pixel statistics in [0, 1] units."""

    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    sources: list[str] = field(default_factory=list)  # the files read, as the loader reported them
    # Training images without labels (labels all UNLABELLED): withheld from the train split, or another
    # data set's; only the distilled student learns from them, through the teacher.
    unlabelled: ImageSet | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train.images.shape[1:])

    def summary(self) -> dict:
        """Where the data came from and how it was split: the head of every run log and of metrics.json."""
        return {"name": self.name, "sources": list(self.sources),
                "sizes": {split: len(data) for split, data in self._splits()},
                "num_classes": self.num_classes, "classes": list(self.classes),
                "input_shape": list(self.input_shape)}

    def describe(self) -> str:
        """`summary` in one line."""
        sizes = " / ".join(f"{len(data):,} {split}" for split, data in self._splits())
        shape = "x".join(map(str, self.input_shape))
        return f"{self.name}: {sizes}, {shape}, {self.num_classes} classes, from {_sources_text(self.sources)}"

    def digest(self) -> str:
        """SHA-256 (hex) of the name, class names, and every split's images and labels (shapes, dtypes, bytes).

        Two DataSplits with the same digest hold the same data, split the same way: a run folder
        records it to notice when `data.root` later points at other files. About 40 ms for
        Fashion-MNIST (55 MB) on a 2-core CPU.
        """
        # The JSON head fixes every split's shape and dtype, so the raw bytes after it cannot be re-cut.
        head = {"format": "kdistill-data-1", "name": self.name, "classes": list(self.classes),
                "splits": {split: {key: [str(t.dtype), list(t.shape)]
                                   for key, t in (("images", data.images), ("labels", data.labels))}
                           for split, data in self._splits()}}
        sha = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
        for _, data in self._splits():
            for tensor in (data.images, data.labels):
                sha.update(tensor.contiguous().numpy())  # native byte order: little-endian on every usual CPU
        return sha.hexdigest()

    def _splits(self) -> tuple[tuple[str, ImageSet], ...]:
        splits = (("train", self.train), ("val", self.val), ("test", self.test))
        return splits + ((("unlabelled", self.unlabelled),) if self.unlabelled is not None else ())


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of uint8 images, in [0, 1] units.

    A 256-bin histogram per channel gives exact sums in float64 without building a
    float copy of the whole split.
    """
    means, stds = [], []
    values = torch.arange(256, dtype=torch.float64) / 255
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        total = counts.sum()
        mean = (counts * values).sum() / total
        var = (counts * (values - mean) ** 2).sum() / total
        means.append(float(mean))
        stds.append(math.sqrt(float(var)))
    return tuple(means), tuple(stds)


def _sources_text(sources: list[str], shown: int = 2) -> str:
    if not sources:
        return "(no files: built in)"
    more = len(sources) - shown
    return ", ".join(sources[:shown]) + (f" and {more} more" if more > 0 else "")
