"""Mini-batches sliced straight from in-memory tensors (no Dataset/DataLoader per-sample overhead).

On a GPU the uint8 images can live on the device (`on_device`): batches are then gathered,
augmented and normalised there, with no host-to-device copy per step and no worker processes.
"""

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from kdistill.data.augment import Augment, Draws
from kdistill.data.sets import ImageSet
from kdistill.errors import KdistillError

# `on_device="auto"` keeps a split on a CUDA device when it takes less than this share of the free memory.
ON_DEVICE_SHARE = 0.25


class _BatchFields(NamedTuple):
    inputs: torch.Tensor  # float32 [B, C, H, W], normalised
    labels: torch.Tensor  # int64 [B]; float [B, C] class probabilities when batches are mixed (mixup, cutmix)
    # int64 [B]: rows of the teacher's logit table, the sample's position in the ImageSet
    # (plus view * len(ImageSet) when the loader draws cached views)
    index: torch.Tensor


class Batch(_BatchFields):
    """(inputs, labels, index), on the loader's device, with `share` as an attribute.

    share = n_local * world_size / n_global: this process's rows over an even split of the global
    batch (1.0 but for a global batch that splits unevenly). Scaling each process's mean loss by it
    makes DDP's gradient average the gradient of the global batch's mean loss. It is an attribute,
    not a tuple item, so that `inputs, labels, index = batch` keeps working.
    """

    share: float = 1.0

    def __new__(cls, inputs: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, share: float = 1.0):
        batch = super().__new__(cls, inputs, labels, index)
        batch.share = share
        return batch

    def _replace(self, **changes) -> "Batch":
        share = changes.pop("share", self.share)  # the tuple's own _replace would drop it
        return Batch(*super()._replace(**changes), share=share)


class BatchLoader:
    """Batches sliced from in-memory tensors: no per-sample Python work.

    Shuffling and augmentation draw from one CPU generator seeded from (seed, epoch), once per
    epoch, so an epoch's batches are a pure function of those two numbers on every device and in
    every process: call `set_epoch` before iterating and a resumed run sees exactly the batches the
    original run saw.

    device: where batches are yielded (default CPU). on_device: True keeps the uint8 split on the
    device (moved once, at the first iteration) and builds batches there; False builds them on the
    host and copies them (from pinned memory on CUDA) without waiting; "auto" is True on the CPU,
    on MPS, and on CUDA when the split takes less than a quarter of the free memory.

    `batch_size` is the global batch. With `world_size` processes, rank r yields the rows
    [r * n // w, (r + 1) * n // w) of each global batch of n samples, so the processes' batches,
    concatenated in rank order, are exactly the single-process batches, augmentation included. When
    shuffling (training), a last global batch smaller than `world_size` is dropped in every process
    (at most world_size - 1 samples per epoch), so every process takes the same number of steps;
    otherwise (evaluation) every sample is kept, and a process with no rows of it skips it.
    Mixup and cutmix pair rows within each process's share of a batch, so with them the batches
    of several processes are not exactly the single-process ones.

    views: 0 draws fresh augmentation choices every epoch. K > 0 gives each sample, every epoch,
    one of K fixed views (`Augment.view`), and `index` then names the (view, sample) row of a
    teacher table of K * N logits. `set_view(v)` makes every sample take view v (to build that table).
    `num_classes` is needed by mixup and cutmix (the labels become class probabilities).
    """

    def __init__(self, data: ImageSet, batch_size: int, *, mean: Sequence[float], std: Sequence[float],
                 shuffle: bool = False, augment: Augment | None = None, seed: int = 0, drop_last: bool = False,
                 device: torch.device | str | None = None, on_device: bool | str = "auto", rank: int = 0,
                 world_size: int = 1, views: int = 0, num_classes: int | None = None):
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
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise KdistillError(f"world_size must be a positive integer, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise KdistillError(f"rank must be an integer with 0 <= rank < world_size ({world_size}), got {rank!r}")
        if isinstance(views, bool) or not isinstance(views, int) or views < 0:
            raise KdistillError(f"views must be a non-negative integer (0 = fresh augmentation), got {views!r}")
        if views and (augment is None or not augment.per_sample):
            raise KdistillError("views > 0 needs an augment with a per-sample transform: without one every view "
                                "is the plain image")
        if views and augment.mixes:
            raise KdistillError("mixup and cutmix blend two samples per batch, so their teacher outputs cannot be "
                                "cached as views: use views=0 (a live teacher)")
        if augment is not None and augment.mixes and (isinstance(num_classes, bool)
                                                       or not isinstance(num_classes, int) or num_classes < 2):
            raise KdistillError(f"mixup and cutmix need num_classes (an integer >= 2) to blend the labels, "
                                f"got {num_classes!r}")
        if not isinstance(on_device, bool) and on_device != "auto":
            raise KdistillError(f"on_device must be True, False or 'auto', got {on_device!r}")
        try:
            self.device = torch.device("cpu" if device is None else device)
        except (RuntimeError, TypeError) as error:
            raise KdistillError(f"device: {error}") from None
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment if augment is not None and augment.enabled else None
        self.seed = seed
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.on_device = _fits(data, self.device) if on_device == "auto" else on_device
        self.epoch, self.start_step = 0, 0
        self.views, self.view, self.num_classes = views, None, num_classes
        self._view_draws = None  # every view's choices on the device, made at the first iteration that needs them
        self._source = None  # (images, labels) on the device, moved at the first iteration when on_device
        mean = tuple(float(m) for m in mean)
        std = tuple(float(s) for s in std)
        # Per-channel constants built once, on the batches' device; each batch then normalises in place.
        self._shift = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale = torch.tensor([1 / s for s in std], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.preprocessing = f"normalize(mean={mean!r}, std={std!r}); augment={self.augment!r}" + \
            (f"; views={views}" if views else "")

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Pick the epoch whose shuffle order and augmentation the next iterations produce; the next iteration
        (only that one) starts at global batch `start_step`, to resume mid-epoch."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise KdistillError(f"epoch must be a non-negative integer, got {epoch!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step <= len(self):
            raise KdistillError(f"start_step must be an integer in [0, {len(self)}], got {start_step!r}")
        self.epoch, self.start_step = epoch, start_step

    def set_view(self, view: int | None) -> None:
        """Make every sample take view `view` (None: each its own, drawn per epoch)."""
        if view is not None and (isinstance(view, bool) or not isinstance(view, int) or not 0 <= view < self.views):
            raise KdistillError(f"view must be None or an integer in [0, {self.views}), got {view!r}")
        self.view = view

    @property
    def num_samples(self) -> int:
        """Samples yielded per (whole) epoch by all processes together: the count samples/s is computed from.

        Fewer than len(data) when drop_last drops a short last batch, or when shuffling it is too small to split."""
        n = len(self.data)
        last = n % self.batch_size
        return n - last if self.drop_last or (self.shuffle and last < self.world_size) else n

    def __len__(self) -> int:
        """Global batches per (whole) epoch, the same in every process."""
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        # Arithmetic, not hash(), so the stream is the same in every process and Python version.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.data)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        view = None
        if self.views:
            # Which view each sample takes this epoch (from the CPU generator: the same on every device);
            # its choices are the view's, made once per loader.
            view = torch.full((n,), self.view, device=self.device) if self.view is not None else \
                torch.randint(self.views, (n,), generator=generator, device="cpu").to(self.device)
            if self._view_draws is None:
                self._view_draws = [self.augment.view(n, v).to(self.device) for v in range(self.views)]
            draws = Draws.choose(self._view_draws, view)
        elif self.augment is not None and self.augment.per_sample:
            # The draws are small (tens of bytes a sample): on the device once per epoch, whichever path batches take.
            draws = self.augment.draw(n, generator).to(self.device)
        else:
            draws = None
        mixings = self.augment.draw_mixing(len(self), generator) if self.augment is not None else []
        images, labels = self.data.images, self.data.labels
        if self.on_device:
            if self._source is None:
                self._source = images.to(self.device), labels.to(self.device)
            images, labels = self._source
            order = order.to(self.device)
        copy = self._pinned_copy if self.device.type == "cuda" else self._copy
        total, w = self.num_samples, self.world_size
        first, self.start_step = self.start_step, 0
        for start in range(first * self.batch_size, total, self.batch_size):
            size = min(self.batch_size, total - start)
            low, high = start + self.rank * size // w, start + (self.rank + 1) * size // w
            if low == high:  # evaluation: fewer samples left than processes
                continue
            index = order[low:high]
            x, y = images[index], labels[index]
            if not self.on_device:
                x, y, index = copy(x), copy(y), copy(index)
            x = x.float().div_(255)  # uint8 crosses to the device: a quarter of the float32 bytes
            if draws is not None:
                rows = draws[index]  # each sample's own choices (index is on the device by now)
                x = self.augment.apply(x, rows)
            x = x.sub_(self._shift).mul_(self._scale)
            if draws is not None:
                x = self.augment.cut_out(x, rows)
            if mixings:
                x, y = self.augment.mix(x, y, self.num_classes, mixings[start // self.batch_size])
            if view is not None:
                index = view[index] * n + index
            yield Batch(x, y, index, (high - low) * w / size)

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def _pinned_copy(self, t: torch.Tensor) -> torch.Tensor:
        """From page-locked memory the copy runs asynchronously, overlapping the previous step's kernels."""
        return t.pin_memory().to(self.device, non_blocking=True)


def _fits(data: ImageSet, device: torch.device) -> bool:
    """Whether a split should live on `device`: trivially on the CPU, and on MPS (which shares the machine's
    memory); on CUDA when it takes less than ON_DEVICE_SHARE of the free memory."""
    if device.type in ("cpu", "mps"):
        return True
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return data.images.nbytes + data.labels.nbytes < ON_DEVICE_SHARE * free
    return False  # free memory unknown: the host path works everywhere
