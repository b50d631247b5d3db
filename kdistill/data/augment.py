"""Batch-wise random crop and horizontal flip, vectorised over the samples, on any device."""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdistill.errors import KdistillError


@dataclass(frozen=True)
class Draws:
    """The random choices of an augmentation for some samples: flips [n] (or None) and crop offsets [2, n] (or None).

    Index it with a slice to get the choices of a batch's rows.
    """

    flip: torch.Tensor | None
    offsets: torch.Tensor | None

    def __getitem__(self, rows: slice) -> "Draws":
        return Draws(None if self.flip is None else self.flip[rows],
                     None if self.offsets is None else self.offsets[:, rows])

    def to(self, device: torch.device) -> "Draws":
        return Draws(None if self.flip is None else self.flip.to(device),
                     None if self.offsets is None else self.offsets.to(device))


@functools.lru_cache(maxsize=16)
def _grid(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column numbers [1, h] and [1, w] on `device`, built once rather than at every batch."""
    return torch.arange(h, device=device)[None], torch.arange(w, device=device)[None]


@dataclass(frozen=True)
class Augment:
    """Standard light augmentation: random crop after zero padding, and horizontal flip.

    crop_padding: pad each side by this many zero pixels, then crop a random H x W window (0 = off).
    hflip: mirror each sample left-right with probability 0.5.
    """

    crop_padding: int = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise KdistillError(f"crop_padding must be a non-negative integer, got {self.crop_padding!r}")
        if not isinstance(self.hflip, bool):
            raise KdistillError(f"hflip must be true or false, got {self.hflip!r}")

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.hflip

    def draw(self, n: int, generator: torch.Generator) -> Draws:
        """The random choices for `n` samples from a CPU `generator`: flips first, then (dy, dx) offsets.

        Apart from `apply` so that a loader can draw a whole epoch's choices on the CPU at once and
        apply them on the device: the same augmented images on every device and in every process.
        """
        flip = torch.rand(n, generator=generator) < 0.5 if self.hflip else None
        p = self.crop_padding
        offsets = torch.randint(0, 2 * p + 1, (2, n), generator=generator) if p else None
        return Draws(flip, offsets)

    def apply(self, x: torch.Tensor, draws: Draws) -> torch.Tensor:
        """Augment a batch [B, C, H, W] with its draws (on x's device). Pass pixels before normalisation,
        so the padding is black."""
        if not self.enabled:
            return x
        b, c, h, w = x.shape
        p = self.crop_padding
        rows, cols = _grid(h, w, x.device)
        if p:
            x = F.pad(x, (p, p, p, p))
            dy, dx = draws.offsets
            rows, cols = dy[:, None] + rows, dx[:, None] + cols
        wp = w + 2 * p
        if draws.flip is not None:
            cols = torch.where(draws.flip[:, None], wp - 1 - cols, cols)
        # Crop and flip are one gather: each output pixel names its source pixel in the padded image.
        source = (rows[:, :, None] * wp + cols[:, None, :]).expand(b, h, w).reshape(b, 1, h * w).expand(b, c, h * w)
        return x.reshape(b, c, -1).gather(2, source).view(b, c, h, w)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a batch with choices drawn from `generator` now: apply(x, draw(len(x), generator))."""
        if not self.enabled:
            return x
        return self.apply(x, self.draw(x.shape[0], generator).to(x.device))
