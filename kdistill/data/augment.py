"""Batch-wise random crop and horizontal flip, vectorised over the samples."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdistill.errors import KdistillError


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

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a batch [B, C, H, W]; each sample gets its own flip and offsets drawn from `generator`.

        Pass pixels before normalisation so the padding is black. Flips are drawn first,
        then (dy, dx) crop offsets.
        """
        if not self.enabled:
            return x
        b, c, h, w = x.shape
        p = self.crop_padding
        flip = torch.rand(b, generator=generator) < 0.5 if self.hflip else None
        if p:
            dy, dx = torch.randint(0, 2 * p + 1, (2, b), generator=generator)
            x = F.pad(x, (p, p, p, p))
        else:
            dy = dx = torch.zeros(b, dtype=torch.long)
        wp = w + 2 * p
        # Crop and flip are one gather: each output pixel names its source pixel in the padded image.
        rows = dy[:, None] + torch.arange(h)
        cols = dx[:, None] + torch.arange(w)
        if flip is not None:
            cols = torch.where(flip[:, None], wp - 1 - cols, cols)
        source = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
        return x.reshape(b, c, -1).gather(2, source).view(b, c, h, w)
