"""Mini-batches sliced straight from in-memory tensors (no Dataset/DataLoader per-sample overhead)."""

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from kdistill.data.augment import Augment
from kdistill.data.sets import ImageSet
from kdistill.errors import KdistillError


class Batch(NamedTuple):
    inputs: torch.Tensor  # float32 [B, C, H, W], normalised
    labels: torch.Tensor  # int64 [B]
    index: torch.Tensor  # int64 [B], positions in the ImageSet (for soft-label cache look-ups)


class BatchLoader:
    """Batches sliced from in-memory tensors: no per-sample Python work.

    Shuffling and augmentation draw from one generator seeded from (seed, epoch), so an
    epoch's batches are a pure function of those two numbers: call `set_epoch` before
    iterating and a resumed run sees exactly the batches the original run saw.
    """

    def __init__(self, data: ImageSet, batch_size: int, *, mean: Sequence[float], std: Sequence[float],
                 shuffle: bool = False, augment: Augment | None = None, seed: int = 0, drop_last: bool = False):
        channels = data.images.shape[1]
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise KdistillError(f"batch_size must be a positive integer, got {batch_size!r}")
        if len(mean) != channels or len(std) != channels:
            raise KdistillError(f"mean and std need one value per channel ({channels}), "
                                f"got {len(mean)} and {len(std)}; use the DataSplits' mean/std")
        if min(std) <= 0:
            raise KdistillError(f"std must be positive, got {tuple(std)}; a constant channel cannot be normalised")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise KdistillError(f"seed must be a non-negative integer, got {seed!r}")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment if augment is not None and augment.enabled else None
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        mean = tuple(float(m) for m in mean)
        std = tuple(float(s) for s in std)
        # Per-channel constants built once; each batch then normalises in place.
        self._shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._scale = torch.tensor([1 / s for s in std], dtype=torch.float32).view(1, -1, 1, 1)
        self.preprocessing = f"normalize(mean={mean!r}, std={std!r}); augment={self.augment!r}"

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch whose shuffle order and augmentation the next iteration produces."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise KdistillError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples yielded per epoch (fewer than len(data) when drop_last drops a short batch)."""
        n = len(self.data)
        return n - n % self.batch_size if self.drop_last else n

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        # Arithmetic, not hash(), so the stream is the same in every process and Python version.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.data)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        for start in range(0, self.num_samples, self.batch_size):
            index = order[start:start + self.batch_size]
            x = self.data.images[index].float().div_(255)
            if self.augment is not None:
                x = self.augment(x, generator)
            x = x.sub_(self._shift).mul_(self._scale)
            yield Batch(x, self.data.labels[index], index)
