"""The unlabelled pool: training images the distilled student learns from through the teacher alone.

Two sources, which add up: part of the training split with its labels withheld
(`data.labelled_fraction`, a fixed choice drawn with `data.split_seed`), and another data set's
images of the same shape (`data.unlabelled`). The teacher and the baseline train on the labelled
part only; the distilled student trains on the labelled part and the pool together, its pool rows
labelled UNLABELLED (ignored by the cross-entropy), filtered by the teacher's confidence and
balanced across pseudo-classes (`select_pseudo_labelled`).
"""

from __future__ import annotations

import dataclasses

import torch

from kdistill.data.sets import UNLABELLED, DataSplits, ImageSet
from kdistill.errors import KdistillError


def withhold_labels(data: DataSplits, fraction: float, seed: int) -> DataSplits:
    """Keep the labels of `fraction` of the train split (at least one sample); the rest joins the pool."""
    count = len(data.train)
    kept = max(1, round(fraction * count))
    if kept >= count:
        return data
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + 1))  # not the val carve's draw
    labelled = data.train.subset(order[:kept].sort().values)
    withheld = data.train.subset(order[kept:].sort().values).images
    return add_pool(dataclasses.replace(data, train=labelled), withheld, f"{count - kept:,} training images "
                                                                           "with their labels withheld")


def add_pool(data: DataSplits, images: torch.Tensor, source: str) -> DataSplits:
    """`data` with `images` added to its unlabelled pool."""
    if tuple(images.shape[1:]) != data.input_shape:
        raise KdistillError(f"data.unlabelled: the pool's images are {'x'.join(map(str, images.shape[1:]))} but "
                            f"the {data.name} images are {'x'.join(map(str, data.input_shape))}; pick a pool of the "
                            "same shape, or set data.channels and data.image_size to convert both")
    if data.unlabelled is not None:
        images = torch.cat([data.unlabelled.images, images])
    pool = ImageSet(images, torch.full((len(images),), UNLABELLED, dtype=torch.int64))
    return dataclasses.replace(data, unlabelled=pool, sources=[*data.sources, source])


def with_pool(data: DataSplits, rows: torch.Tensor | None = None) -> ImageSet:
    """The distilled student's training set: the labelled train split, then the pool (or its `rows`)."""
    if data.unlabelled is None:
        return data.train
    pool = data.unlabelled if rows is None else data.unlabelled.subset(rows)
    return ImageSet(torch.cat([data.train.images, pool.images]), torch.cat([data.train.labels, pool.labels]))


def select_pseudo_labelled(logits: torch.Tensor, min_confidence: float = 0.0,
                           balance: bool = False) -> tuple[torch.Tensor, str]:
    """Rows of the pool to learn from, given the teacher's logits on it [P, C]: (sorted row indices, a line
    saying what was kept). Rows whose top class probability (T = 1) is below `min_confidence` are dropped;
    with `balance`, each pseudo-class keeps as many rows as the rarest non-empty one, its most confident."""
    probabilities = torch.softmax(logits.float(), dim=1)
    confidence, classes = probabilities.max(dim=1)
    total = len(confidence)
    keep = torch.nonzero(confidence >= min_confidence).flatten()
    said = [f"{total:,} unlabelled samples"]
    if min_confidence > 0:
        said.append(f"{len(keep):,} with teacher confidence >= {min_confidence:g}")
    if len(keep) == 0:
        raise KdistillError(f"distill.pseudo_labels.min_confidence={min_confidence:g} drops all {total:,} unlabelled "
                            f"samples (the teacher's highest confidence on them is {float(confidence.max()):.3f}): "
                            "lower it")
    if balance:
        counts = torch.bincount(classes[keep], minlength=logits.shape[1])
        cap = int(counts[counts > 0].min())
        chosen = []
        for label in torch.nonzero(counts).flatten().tolist():
            rows = keep[classes[keep] == label]
            chosen.append(rows[confidence[rows].argsort(descending=True)[:cap]])
        keep = torch.cat(chosen).sort().values
        empty = int((counts == 0).sum())
        said.append(f"balanced to {cap:,} per pseudo-class" + (f" ({empty} classes have none)" if empty else ""))
    said.append(f"{len(keep):,} kept")
    return keep, ", ".join(said)
