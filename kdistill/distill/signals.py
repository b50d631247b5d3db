"""Teacher signals: where a student's targets come from, live or cached.

The student code does not care which: both give `TeacherOutput(logits, features)` for a batch.
`LiveTeacher` runs the frozen teacher (eval mode, inference mode) on exactly the inputs the
student sees (needed with augmentation). `CachedTeacher` looks the logits up by sample index in
a table computed once per (teacher weights, data, preprocessing) and kept on disk.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from kdistill.distill.taps import FeatureTaps
from kdistill.errors import KdistillError
from kdistill.train.checkpoint import load_tensors, save_tensors
from kdistill.train.loop import autocast, unpack


def default_cache_dir() -> Path:
    """$KDISTILL_CACHE_DIR, else ~/.cache/kdistill/soft_labels."""
    return Path(os.environ.get("KDISTILL_CACHE_DIR", "~/.cache/kdistill/soft_labels")).expanduser()


@dataclass
class TeacherOutput:
    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)


def freeze(teacher: nn.Module) -> nn.Module:
    """A teacher never trains: eval mode (BatchNorm statistics, dropout off), no gradients."""
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


class LiveTeacher:
    def __init__(self, teacher: nn.Module, taps: Sequence[str] = ()):
        self.teacher = freeze(teacher)
        self.taps = FeatureTaps(teacher, taps) if taps else None

    def __call__(self, inputs: Tensor, index: Tensor | None = None) -> TeacherOutput:
        logits, features = self._forward(inputs)
        # Inference tensors cannot be saved for backward; clones made outside inference mode are
        # ordinary tensors that loss terms may compute with freely.
        return TeacherOutput(logits.clone(), {k: v.clone() for k, v in features.items()})

    @torch.inference_mode()
    def _forward(self, inputs: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        self.teacher.eval()
        logits = self.teacher(inputs)
        return logits, (self.taps.pop() if self.taps else {})


class CachedTeacher:
    """Teacher logits looked up by the index of each sample in the training set."""

    def __init__(self, logits: Tensor):
        self.logits = logits.float()

    def __call__(self, inputs: Tensor, index: Tensor | None = None) -> TeacherOutput:
        if index is None:
            raise ValueError("cached soft labels need batches that carry sample indices "
                             "(kdistill.data.BatchLoader does); use a live teacher otherwise")
        return TeacherOutput(self.logits[index])


def _raw_bytes(tensor: Tensor) -> bytes:
    # Flattened first: 0-dim tensors (BatchNorm's num_batches_tracked) cannot be re-viewed as bytes.
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(_raw_bytes(tensor))
    return digest.hexdigest()


def tensor_digest(*tensors: Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(_raw_bytes(tensor))
    return digest.hexdigest()


CACHE_VERSION = "1"  # bump when a change to kdistill's models or preprocessing changes their outputs


def soft_label_key(teacher: nn.Module, images: Tensor, preprocessing: str, precision: str = "fp32") -> str:
    """What the cached logits depend on: teacher class and weights, the exact images, their preprocessing."""
    kind = f"{type(teacher).__module__}.{type(teacher).__qualname__}"
    parts = [CACHE_VERSION, kind, weights_digest(teacher), tensor_digest(images), preprocessing, precision]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


@torch.inference_mode()
def teacher_logits(teacher: nn.Module, loader, num_samples: int, precision: str = "fp32") -> Tensor:
    """Run the frozen teacher over an unshuffled, unaugmented loader; rows in sample order."""
    freeze(teacher)
    table, filled = None, torch.zeros(num_samples, dtype=torch.bool)
    for batch in loader:
        inputs, _, index = unpack(batch)
        with autocast(precision):
            logits = teacher(inputs).float()
        if table is None:
            table = torch.empty(num_samples, logits.shape[1])
        table[index] = logits
        filled[index] = True
    if table is None or not filled.all():
        raise ValueError("the loader did not cover every training sample")
    if not torch.isfinite(table).all():
        raise KdistillError("the teacher's logits contain NaN or inf: check the teacher checkpoint")
    return table


def cached_teacher_logits(teacher: nn.Module, loader, images: Tensor, preprocessing: str,
                          cache_dir: Path | None = None, precision: str = "fp32") -> tuple[Tensor, Path, bool]:
    """Load the teacher's logits for the training set from the cache, or compute and store them.

    Returns (logits [N, C], cache file, whether they were computed now).
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = soft_label_key(teacher, images, preprocessing, precision)
    path = cache_dir / f"{key}.safetensors"
    if path.exists():
        logits = load_tensors(path)[0].get("logits")
        if logits is not None and logits.shape[0] == images.shape[0] and torch.isfinite(logits).all():
            return logits, path, False
        path.unlink()  # not what we write: recompute rather than trust it
    logits = teacher_logits(teacher, loader, images.shape[0], precision)
    save_tensors(path, {"logits": logits}, {"preprocessing": preprocessing, "precision": precision})
    return logits, path, True
