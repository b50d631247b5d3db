"""Batch-wise augmentations as tensor operations on the batch's device, vectorised over the samples.

Two kinds:

* Per-sample transforms: random resized crop, crop after zero padding, horizontal and vertical
  flips, colour jitter, cutout. Each sample's random choices (its `Draws`) are drawn on the CPU
  for a whole epoch at once, then applied on the device. Because the choices are data, a view of a
  sample can be made again exactly: `Augment.view(n, v)` gives the choices of view v for every
  sample, a pure function of (seed, view, sample), which is what cached teacher views rely on.
* Batch mixing: mixup and cutmix blend each sample with a partner from the same batch (its mirror
  image in the batch: row i with row B-1-i, as timm does; batches are shuffled, so pairs are random).
  The labels are blended with the same weight, so they become class probabilities [B, C]. The
  teacher must see the mixed batch, so mixed batches cannot use cached teacher logits.

Order: resized crop, pad-and-crop with flips, colour jitter on pixels in [0, 1]; then (after the
loader normalises) cutout, whose zeros are the data's mean as in DeVries & Taylor's code; then mixing.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from kdistill.errors import KdistillError

# Aspect ratios of random resized crops, as torchvision's RandomResizedCrop: [3/4, 4/3], log-uniform.
LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


@dataclass(frozen=True)
class Draws:
    """The random choices of the per-sample transforms, each tensor with one row per sample.

    Index it with a slice or an index tensor to get the choices of some rows.
    """

    fields: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, rows) -> Draws:
        return Draws({k: v[rows] for k, v in self.fields.items()})

    def get(self, name: str) -> torch.Tensor | None:
        return self.fields.get(name)

    def to(self, device: torch.device) -> Draws:
        return Draws({k: v.to(device) for k, v in self.fields.items()})

    @staticmethod
    def choose(views: list[Draws], chosen: torch.Tensor) -> Draws:
        """Per sample i, the choices of view chosen[i] (views are Draws of the same samples)."""
        rows = torch.arange(len(chosen), device=chosen.device)
        return Draws({k: torch.stack([v.fields[k] for v in views])[chosen, rows] for k in views[0].fields})


@dataclass(frozen=True)
class Mixing:
    """One batch's mixing: kind ("mixup" | "cutmix") and the blend weight of the batch's own samples."""

    kind: str
    lam: float
    centre: tuple[float, float] = (0.5, 0.5)  # cutmix: the box's centre, as fractions of height and width


@functools.lru_cache(maxsize=16)
def _grid(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column numbers [1, h] and [1, w] on `device`, built once rather than at every batch."""
    return torch.arange(h, device=device)[None], torch.arange(w, device=device)[None]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Augment:
    """Augmentations of training batches; every one is off by default.

    resized_crop: (min, max) area fraction of a random resized crop (Szegedy et al. 2015; torchvision's
        default is (0.08, 1)), aspect ratio log-uniform in [3/4, 4/3], resized back bilinearly. A crop
        wider or taller than the image is clipped to it (torchvision retries ten draws instead).
    crop_padding: pad each side by this many zero pixels, then crop a random H x W window.
    hflip, vflip: mirror each sample left-right (up-down) with probability 0.5.
    color_jitter: brightness, contrast and saturation each scaled by a factor uniform in
        [1 - s, 1 + s], in that order (torchvision's ColorJitter(s, s, s) without hue, fixed order).
    cutout: zero a square of this side in pixels at a uniform random centre, clipped at the borders
        (DeVries & Taylor 2017).
    mixup: alpha of the Beta(alpha, alpha) blend weight (Zhang et al. 2018); 0 = off.
    cutmix: alpha of the Beta weight giving the box's area (Yun et al. 2019); 0 = off. With both
        on, each batch takes one of them with probability 0.5.
    seed: the seed of `view`'s choices.
    """

    resized_crop: tuple[float, float] | None = None
    crop_padding: int = 0
    hflip: bool = False
    vflip: bool = False
    color_jitter: float = 0.0
    cutout: int = 0
    mixup: float = 0.0
    cutmix: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resized_crop is not None:
            scale = tuple(self.resized_crop) if isinstance(self.resized_crop, (tuple, list)) else ()
            if len(scale) != 2 or not all(map(_is_number, scale)) or not 0 < scale[0] <= scale[1] <= 1:
                raise KdistillError(f"resized_crop must be [min, max] area fractions with 0 < min <= max <= 1, "
                                    f"got {self.resized_crop!r}; e.g. [0.35, 1]")
            object.__setattr__(self, "resized_crop", (float(scale[0]), float(scale[1])))
        for name in ("crop_padding", "cutout", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise KdistillError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("hflip", "vflip"):
            if not isinstance(getattr(self, name), bool):
                raise KdistillError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not _is_number(self.color_jitter) or not 0 <= self.color_jitter <= 1:
            raise KdistillError(f"color_jitter must be in [0, 1], got {self.color_jitter!r}")
        for name in ("mixup", "cutmix"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise KdistillError(f"{name} must be a non-negative alpha (0 = off; 0.2 to 1 are usual), got {value!r}")

    @property
    def enabled(self) -> bool:
        return self.per_sample or self.mixes

    @property
    def per_sample(self) -> bool:
        """Whether any per-sample transform is on (those are the ones a cached view can reproduce)."""
        return bool(self.resized_crop or self.crop_padding or self.hflip or self.vflip or self.color_jitter
                    or self.cutout)

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    # -- random choices ----------------------------------------------------------------------
    def draw(self, n: int, generator: torch.Generator) -> Draws:
        """The per-sample choices for `n` samples from a CPU `generator`, in a fixed order.

        Apart from `apply` so that a loader can draw a whole epoch's choices on the CPU at once and
        apply them on the device: the same augmented images on every device and in every process.
        """
        fields = {}

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(n, *shape, generator=generator, device=generator.device)

        if self.resized_crop:
            low, high = self.resized_crop
            area = low + (high - low) * uniform()
            ratio = torch.exp(LOG_RATIO[0] + (LOG_RATIO[1] - LOG_RATIO[0]) * uniform())
            size = torch.stack([torch.sqrt(area / ratio), torch.sqrt(area * ratio)], 1).clamp(max=1)  # height, width
            fields["crop_box"] = torch.cat([size, (1 - size) * uniform(2)], 1)  # [h, w, top, left] as fractions
        if self.crop_padding:
            fields["offsets"] = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=generator,
                                              device=generator.device)
        if self.hflip:
            fields["hflip"] = uniform() < 0.5
        if self.vflip:
            fields["vflip"] = uniform() < 0.5
        if self.color_jitter:
            fields["jitter"] = 1 + self.color_jitter * (2 * uniform(3) - 1)  # brightness, contrast, saturation
        if self.cutout:
            fields["cutout"] = uniform(2)  # the centre, as fractions of height and width
        return Draws(fields)

    def view(self, n: int, view: int) -> Draws:
        """The choices of view `view` of each of `n` samples: a pure function of (seed, view, sample).

        The same on every machine and in every process, so a student regenerates exactly the view
        whose teacher logits were cached.
        """
        return self.draw(n, torch.Generator().manual_seed(self.seed * 1_000_003 + view))

    def draw_mixing(self, batches: int, generator: torch.Generator) -> list[Mixing]:
        """One `Mixing` per batch from a CPU generator (none when neither mixup nor cutmix is on)."""
        if not self.mixes:
            return []
        # torch has no seeded Beta sampler: numpy's, seeded from the generator, keeps it a pure function of it.
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator, device=generator.device)))
        kinds = [k for k in ("mixup", "cutmix") if getattr(self, k) > 0]
        mixings = []
        for _ in range(batches):
            kind = kinds[rng.integers(len(kinds))]
            alpha = getattr(self, kind)
            mixings.append(Mixing(kind, float(rng.beta(alpha, alpha)), (float(rng.random()), float(rng.random()))))
        return mixings

    # -- applying them -----------------------------------------------------------------------
    def apply(self, x: torch.Tensor, draws: Draws) -> torch.Tensor:
        """The geometric and colour transforms of a batch [B, C, H, W] of pixels in [0, 1] (on x's device)."""
        hflip, vflip = draws.get("hflip"), draws.get("vflip")
        if draws.get("crop_box") is not None:
            # Without a padded crop after it, the flips ride along in the resize (free): else in the gather.
            folded = not self.crop_padding
            x = _resized_crop(x, draws.get("crop_box"), hflip if folded else None, vflip if folded else None)
            if folded:
                hflip = vflip = None
        if self.crop_padding or hflip is not None or vflip is not None:
            x = _crop_and_flip(x, self.crop_padding, draws.get("offsets"), hflip, vflip)
        if draws.get("jitter") is not None:
            x = _jitter(x, draws.get("jitter"))
        return x

    def cut_out(self, x: torch.Tensor, draws: Draws) -> torch.Tensor:
        """Cutout on a normalised batch: zero, the data's mean after normalisation, as the paper's code does."""
        centre = draws.get("cutout")
        if centre is None:
            return x
        h, w = x.shape[-2:]
        rows, cols = _grid(h, w, x.device)
        top = (centre[:, :1] * h).long() - self.cutout // 2  # [B, 1]
        left = (centre[:, 1:] * w).long() - self.cutout // 2
        inside_rows = ((rows >= top) & (rows < top + self.cutout)).to(x.dtype)  # [B, H]
        inside_cols = ((cols >= left) & (cols < left + self.cutout)).to(x.dtype)  # [B, W]
        return x * (1 - inside_rows[:, None, :, None] * inside_cols[:, None, None, :])

    def mix(self, x: torch.Tensor, labels: torch.Tensor, num_classes: int, mixing: Mixing
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Blend each sample with its partner (row i with row B-1-i); labels become probabilities [B, C]."""
        targets = F.one_hot(labels, num_classes).to(x.dtype)
        partner, partner_targets = x.flip(0), targets.flip(0)
        lam = mixing.lam
        if mixing.kind == "mixup":
            x = x * lam + partner * (1 - lam)
        else:  # cutmix: a box of area (1 - lam) of the image comes from the partner, as in Yun et al.'s code
            h, w = x.shape[-2:]
            cut = math.sqrt(1 - lam)
            cy, cx = int(mixing.centre[0] * h), int(mixing.centre[1] * w)
            top, bottom = max(cy - int(h * cut) // 2, 0), min(cy + int(h * cut) // 2, h)
            left, right = max(cx - int(w * cut) // 2, 0), min(cx + int(w * cut) // 2, w)
            x = x.clone()
            x[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
            lam = 1 - (bottom - top) * (right - left) / (h * w)  # the box's area once clipped at the borders
        return x, targets * lam + partner_targets * (1 - lam)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The per-sample transforms of a pixel batch with choices drawn from `generator` now (no mixing)."""
        if not self.per_sample:
            return x
        draws = self.draw(x.shape[0], generator).to(x.device)
        return self.cut_out(self.apply(x, draws), draws)


def _resized_crop(x: torch.Tensor, box: torch.Tensor, hflip: torch.Tensor | None = None,
                  vflip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop box [B, 4] = (height, width, top, left) as fractions of the image, resized back to H x W bilinearly,
    then flipped where `hflip` / `vflip` [B] say.

    Bilinear resampling is separable: out = R_rows @ x @ R_cols^T, with one small interpolation matrix
    per sample and side (a flip reverses a matrix's rows). The same values as grid_sample (bilinear,
    border padding, align_corners=False) at a third of its cost on a CPU.
    """
    height, width, top, left = box.to(x.dtype).unbind(1)
    rows = _interpolation(top, height, x.shape[-2], x)  # [B, H, H]
    cols = _interpolation(left, width, x.shape[-1], x)  # [B, W, W]
    if vflip is not None:
        rows = torch.where(vflip[:, None, None], rows.flip(1), rows)
    if hflip is not None:
        cols = torch.where(hflip[:, None, None], cols.flip(1), cols)
    return rows[:, None] @ x @ cols.transpose(1, 2)[:, None]


def _interpolation(start: torch.Tensor, size: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    """[B, n, n] weights: output pixel i samples input coordinate start * n + (i + 0.5) * size - 0.5 (size and
    start as fractions of n, pixel centres at integers), clamped to the border, between its two neighbours."""
    steps = torch.arange(n, dtype=like.dtype, device=like.device)
    source = (start[:, None] * n + (steps + 0.5) * size[:, None] - 0.5).clamp(0, n - 1)  # [B, n]
    return (1 - (source[:, :, None] - steps).abs()).clamp_(min=0)


def _crop_and_flip(x: torch.Tensor, padding: int, offsets: torch.Tensor | None, hflip: torch.Tensor | None,
                   vflip: torch.Tensor | None) -> torch.Tensor:
    """Pad with zeros, crop and flip in one gather: each output pixel names its source pixel in the padded image."""
    b, c, h, w = x.shape
    rows, cols = _grid(h, w, x.device)
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
        rows, cols = offsets[:, :1] + rows, offsets[:, 1:] + cols
    hp, wp = h + 2 * padding, w + 2 * padding
    if hflip is not None:
        cols = torch.where(hflip[:, None], wp - 1 - cols, cols)
    if vflip is not None:
        rows = torch.where(vflip[:, None], hp - 1 - rows, rows)
    source = (rows[:, :, None] * wp + cols[:, None, :]).expand(b, h, w).reshape(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, -1).gather(2, source).view(b, c, h, w)


def _jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation as torchvision's functional ops do them (clamped to [0, 1] after each)."""
    factors = factors.to(x.dtype)[:, :, None, None, None]
    x = (x * factors[:, 0]).clamp_(0, 1)
    grey = _grey(x)
    x = ((x - grey.mean((1, 2, 3), keepdim=True)) * factors[:, 1] + grey.mean((1, 2, 3), keepdim=True)).clamp_(0, 1)
    if x.shape[1] == 3:  # saturation blends with the greyscale image: nothing to do on one channel
        grey = _grey(x)
        x = ((x - grey) * factors[:, 2] + grey).clamp_(0, 1)
    return x


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma [B, 1, H, W] (torchvision's rgb_to_grayscale); a greyscale batch is its own."""
    if x.shape[1] != 3:
        return x[:, :1]
    r, g, b = x.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b)[:, None]
