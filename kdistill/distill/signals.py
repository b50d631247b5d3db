"""Teacher signals: where a student's targets come from, live or cached.

The student code does not care which: both give `TeacherOutput(logits, features)` for a batch.
`LiveTeacher` runs the frozen teacher (eval mode, inference mode) on exactly the inputs the
student sees (needed with mixup, cutmix and tapped features). `CachedTeacher` looks the logits up
by sample index in a table computed once per (teacher, data, preprocessing) and kept on disk, with
the teacher's outputs on a few probe inputs that tell, on every load, whether the teacher still
behaves the same. With per-sample augmentation the table holds K augmented views of every sample
(Shen & Xing 2022): the loader regenerates exactly the view whose logits are stored, so the student
is never taught on a view the teacher did not see (which Beyer et al. 2022 found hurts). With many
classes a table can keep only each row's top-k logits and the mass of the rest (`TopKLogits`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kdistill.config.loading import TEACHER_SIGNALS
from kdistill.data.augment import Augment
from kdistill.distill.taps import FeatureTaps
from kdistill.errors import KdistillError
from kdistill.storage import atomic_files, exclusive_lock, remove_stale_temporaries
from kdistill.train.checkpoint import load_tensors, save_tensors
from kdistill.train.devices import autocast, device_of
from kdistill.train.loop import unpack


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
        # Not frozen here: a Distiller may be built before its teacher is trained. Each call runs it
        # in eval mode under inference_mode, and whoever trains with it freezes it meanwhile.
        self.teacher = teacher
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


def choose_teacher_signal(requested: str, augment: Augment | None, taps_teacher: bool,
                          processes: int = 1) -> tuple[str, str]:
    """(signal, why) for a distillation that needs the teacher: `requested` is distill.teacher_signal.

    auto picks the cheapest correct signal: cached logits (and tapped features) without augmentation,
    cached views with per-sample augmentation, the live teacher when batches are mixed or its
    features are tapped on augmented batches (or by several processes: features are cached by one).
    An explicit choice that cannot be right is refused rather than quietly changed.
    """
    if requested not in TEACHER_SIGNALS:
        raise KdistillError(f"distill.teacher_signal: {requested!r} is not one of {', '.join(TEACHER_SIGNALS)}")
    augmented, mixes = augment is not None and augment.enabled, augment is not None and augment.mixes
    if requested == "live":
        return "live", "asked for (distill.teacher_signal=live)"
    if taps_teacher and (augmented or processes > 1):
        why = "augmented batches" if augmented else f"{processes} processes (one builds a feature cache)"
        if requested != "auto":
            raise KdistillError(f"distill.teacher_signal={requested}: the loss terms read the teacher's features, "
                                f"which are cached only for unaugmented batches in one process, and this run has "
                                f"{why}; use live (or auto)")
        return "live", f"the loss terms read the teacher's features, on {why}"
    if mixes:
        if requested != "auto":
            raise KdistillError(f"distill.teacher_signal={requested}: train.augment.mixup / cutmix blend two images "
                                "per batch, so the teacher must see each mixed batch; use live (or auto)")
        return "live", "mixup / cutmix: the teacher sees each mixed batch"
    if requested == "cached" and augmented:
        raise KdistillError("distill.teacher_signal=cached holds the teacher's logits on unaugmented images, but "
                            "train.augment is on: the student would be taught on views the teacher never saw; use "
                            "cached_views (or auto)")
    if requested == "cached_views" and not augmented:
        raise KdistillError("distill.teacher_signal=cached_views caches augmented views, but train.augment is off: "
                            "use cached (or auto)")
    if augmented:
        return "cached_views", "per-sample augmentation: the teacher's logits on fixed views of each sample"
    if taps_teacher:
        return "cached", "no augmentation: the teacher's logits and tapped features on each training sample"
    return "cached", "no augmentation: the teacher's logits on each training sample"


class TopKLogits:
    """A compact soft-label table: each row's k largest logits (fp16), their classes, and the log-sum-exp
    of the row's other logits (fp32), for tables whose classes are many (Shen & Xing 2022 keep the top
    5-10 of ImageNet's 1000 per view).

    Indexing rebuilds dense fp32 logits for a batch: the k stored logits as they were, and every other
    class at `tail - log(C - k)`, so that the softmax at T = 1 gives the k classes exactly their
    probabilities and the others, together, exactly their total mass, spread evenly. At other
    temperatures (and for terms that read raw logits, such as logit MSE) the tail is an approximation.
    """

    def __init__(self, values: Tensor, classes: Tensor, tail: Tensor, num_classes: int):
        if not 0 < values.shape[1] < num_classes:
            raise ValueError(f"top-k needs 0 < k < classes, got k={values.shape[1]} of {num_classes}")
        self.values, self.classes, self.tail, self.num_classes = values, classes, tail, num_classes

    @classmethod
    def of(cls, logits: Tensor, k: int) -> "TopKLogits":
        logits = logits.float()
        values, classes = logits.topk(k, dim=1)
        tail = torch.logsumexp(logits.scatter(1, classes, float("-inf")), dim=1)
        index_dtype = torch.int16 if logits.shape[1] <= torch.iinfo(torch.int16).max else torch.int32
        return cls(values.half(), classes.to(index_dtype), tail, logits.shape[1])

    @property
    def k(self) -> int:
        return self.values.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape[0], self.num_classes

    def tensors(self) -> dict[str, Tensor]:
        return {"top_values": self.values, "top_classes": self.classes, "tail_logsumexp": self.tail}

    def to(self, device: torch.device) -> "TopKLogits":
        return TopKLogits(self.values.to(device), self.classes.to(device), self.tail.to(device), self.num_classes)

    def subset(self, index: Tensor) -> "TopKLogits":
        """The table of rows `index` only."""
        return TopKLogits(self.values[index], self.classes[index], self.tail[index], self.num_classes)

    def __getitem__(self, index: Tensor) -> Tensor:
        fill = self.tail[index] - math.log(self.num_classes - self.k)
        dense = fill[:, None].expand(-1, self.num_classes).contiguous()
        return dense.scatter_(1, self.classes[index].long(), self.values[index].float())


def table_subset(table: Tensor | TopKLogits, rows: Tensor, samples: int, views: int = 0) -> Tensor | TopKLogits:
    """A soft-label table of `samples` samples (or `views` x `samples` rows, view-major) cut down to the
    samples `rows`, in their order: what the loader of those samples alone indexes."""
    if views:
        rows = (torch.arange(views)[:, None] * samples + rows[None, :]).flatten()
    return table.subset(rows) if isinstance(table, TopKLogits) else table[rows]


class CachedTeacher:
    """Teacher logits looked up by each batch's `index`: a sample's position in the training set, or a
    (view, sample) row when the loader draws cached views. Kept in the stored dtype (fp16 for views).

    `features` ({tapped module path: [N, ...] table}, memory-mapped fp16 from `cached_teacher_features`)
    are looked up the same way, so feature and relation terms need no teacher at all.
    """

    def __init__(self, logits: Tensor | TopKLogits, features: dict[str, Tensor] | None = None):
        self.logits = logits
        self.features = dict(features or {})

    def to(self, device: torch.device) -> "CachedTeacher":
        """Keep the tables where the batches' indices are: one gather per step, no copy. Feature tables
        move to a GPU only when they take under a quarter of its free memory; otherwise each batch's rows
        are gathered on the host and copied (the index comes back to the host: one sync per step)."""
        self.logits = self.logits.to(device)
        if self.features and _fits_on(device, sum(t.numel() * t.element_size() for t in self.features.values())):
            self.features = {path: table.to(device) for path, table in self.features.items()}
        return self

    def digest(self) -> str:
        table = self.logits
        parts = list(table.tensors().values() if isinstance(table, TopKLogits) else [table])
        # A feature table can be gigabytes: its shape and first rows stand for it (its file is keyed by
        # the teacher and the data anyway).
        parts += [t[:64] for _, t in sorted(self.features.items())]
        return tensor_digest(*parts)

    def __call__(self, inputs: Tensor, index: Tensor | None = None) -> TeacherOutput:
        if index is None:
            raise ValueError("cached soft labels need batches that carry sample indices "
                             "(kdistill.data.BatchLoader does); use a live teacher otherwise")
        features = {path: _rows(table, index).float() for path, table in self.features.items()}
        return TeacherOutput(self.logits[index].float(), features)


def _rows(table: Tensor, index: Tensor) -> Tensor:
    if table.device == index.device:
        return table[index]
    return table[index.cpu()].to(index.device, non_blocking=True)


def _fits_on(device: torch.device, size: int) -> bool:
    if device.type != "cuda":
        return True  # the CPU (the tables are there already, memory-mapped) or MPS (unified memory)
    free, _ = torch.cuda.mem_get_info(device)
    return size < free / 4


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


CACHE_VERSION = "2"  # bump when a change to kdistill's models or preprocessing changes their outputs
PROBE_SIZE = 8


def soft_label_key(teacher: nn.Module, images: Tensor, preprocessing: str, precision: str = "fp32", *,
                   teacher_config: str | None = None, top_k: int = 0) -> str:
    """What the cached logits depend on: the teacher (class, config, repr, weights), the exact images, their
    preprocessing.

    `teacher_config` (the pipeline's resolved name and kwargs) and repr() (standard modules' constructor
    arguments) separate teachers whose weights are equal but whose arguments are not; what neither shows
    (a plain attribute, edited code) is caught by the probe stored in each entry (see `cached_teacher_logits`).
    """
    kind = f"{type(teacher).__module__}.{type(teacher).__qualname__}"
    parts = [CACHE_VERSION, kind, teacher_config or "", repr(teacher), weights_digest(teacher),
             tensor_digest(images), preprocessing, precision]
    if top_k:  # only then, so that full tables keep their keys
        parts.append(f"top_k={top_k}")
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def _every_view(loader):
    """The loader's batches; for a loader of K cached views, those of view 0, then view 1, ... (K passes)."""
    views = getattr(loader, "views", 0)
    if not views:
        yield from loader
        return
    try:
        for view in range(views):
            loader.set_view(view)
            yield from loader
    finally:
        loader.set_view(None)


@torch.inference_mode()
def teacher_logits(teacher: nn.Module, loader, num_samples: int, precision: str = "fp32",
                   total: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Run the frozen teacher over an unshuffled loader; rows in sample order, on the teacher's device.

    The loader is unaugmented, or draws cached views: then `num_samples` is views x samples, and
    the row of view v of sample i is v * samples + i (the loader's `index`). Under torchrun the
    loader gives each process its share of every batch and `total` sums a tensor over processes:
    each fills its own rows of a zero table, and the sum is the whole table, on every process.
    """
    freeze(teacher)
    device = device_of(teacher)
    classes = _probe_outputs(teacher, _probe_inputs(loader, 1)).shape[1]
    table = torch.zeros(num_samples, classes, device=device)
    filled = torch.zeros(num_samples, device=device)  # float: gloo sums no bools
    for batch in _every_view(loader):
        inputs, _, index = unpack(batch)
        inputs, index = inputs.to(device, non_blocking=True), index.to(device, non_blocking=True)
        with autocast(precision, device):
            table[index] = teacher(inputs).float()
        filled[index] += 1
    if total is not None:
        table, filled = total(table), total(filled)
    if not (filled == 1).all():
        raise ValueError("the loader did not give every training sample exactly once")
    if not torch.isfinite(table).all():
        raise KdistillError("the teacher's logits contain NaN or inf: check the teacher checkpoint")
    return table


def check_cache_dir(path: Path | str | None = None) -> Path:
    """The soft-label cache folder (default_cache_dir() if None), created and proven writable.

    Cheap: the pipeline calls it before any training, so an unusable folder stops a run at once
    rather than after the teacher's and the baseline's trainings.
    """
    folder = Path(path).expanduser() if path else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # really create a file: permission bits do not stop root
            pass
    except OSError as err:
        reason = "a file, not a folder" if folder.exists() and not folder.is_dir() else err.strerror or str(err)
        raise KdistillError(f"distill.cache_dir: cannot store soft labels in {folder} ({reason}); "
                            "point distill.cache_dir (or $KDISTILL_CACHE_DIR) to a writable folder") from None
    return folder


def cached_teacher_logits(teacher: nn.Module, loader, images: Tensor, preprocessing: str,
                          cache_dir: Path | None = None, precision: str = "fp32", *, teacher_config: str | None = None,
                          top_k: int = 0, log: Callable[[str], None] | None = None, main: bool = True,
                          total: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor | TopKLogits, Path, bool]:
    """Load the teacher's logits for the training set from the cache, or compute and store them.

    Returns (logits [N, C], cache file, whether they were computed now); with 0 < `top_k` < C, a
    `TopKLogits` table that keeps each row's `top_k` largest logits. An entry that does not
    read back, or whose stored probe outputs the teacher no longer reproduces, is rebuilt with a
    line to `log` (default: stderr). One run at a time checks and builds an entry: a second run
    sharing the teacher waits for the first (a line to `log`) and then loads its entry.

    Several processes of one run (torchrun: `total` sums over them, `main` on rank 0 only, a loader
    sharded by rank) build an entry together: the main process checks it under the lock, and if it
    must be built every process runs the teacher on its share (`teacher_logits`); the main one stores it.
    """
    log = log or _to_stderr
    cache_dir = check_cache_dir(cache_dir)
    configs = getattr(teacher, "member_configs", None)
    if configs:  # an Ensemble: each member's entry is the one a run with that teacher alone makes
        entries = [cached_teacher_logits(member, loader, images, preprocessing, cache_dir, precision,
                                         teacher_config=config, log=log, main=main, total=total)
                   for member, config in zip(teacher.members, configs, strict=True)]
        for number, (_, path, built) in enumerate(entries, start=1):
            log(f"teacher {number} of {len(entries)}: soft labels {'computed and stored' if built else 'loaded'}: "
                f"{path}")
        table = teacher.combine_logits([logits for logits, _, _ in entries])
        return (TopKLogits.of(table, top_k) if 0 < top_k < table.shape[1] else table), entries[0][1], \
            any(built for _, _, built in entries)
    if top_k and top_k >= _probe_outputs(teacher, _probe_inputs(loader, 1)).shape[1]:
        top_k = 0  # k >= C: every logit is kept anyway
    key = soft_label_key(teacher, images, preprocessing, precision, teacher_config=teacher_config, top_k=top_k)
    path = cache_dir / f"{key}.safetensors"
    views = getattr(loader, "views", 0)
    rows = images.shape[0] * max(views, 1)
    lock = exclusive_lock(cache_dir / f"{key}.lock", f"soft-label cache entry {path}", wait=True, on_wait=log) \
        if main else contextlib.nullcontext()
    with lock:
        table, problem = None, "is missing"
        if main:
            remove_stale_temporaries(cache_dir, recursive=False, name=path.name)  # a killed build's, under our lock
            if path.exists():
                table, problem = _read_entry(path, teacher, rows)
                if table is None:
                    log(f"soft-label cache entry {path} {problem}: rebuilding it")
        build = table is None
        if total is not None:  # the main process's verdict, for every process
            build = bool(total(torch.tensor([float(build and main)], device=device_of(teacher))).item())
        if not build:
            if table is None:  # another process of the run: rank 0 has checked the entry
                table, problem = _read_entry(path, teacher, rows)
                if table is None:
                    raise KdistillError(f"soft-label cache entry {path} {problem} in this process although rank 0 "
                                        "read it: give every process the same distill.cache_dir on a shared disk")
            return table, path, False
        table = _compact(teacher_logits(teacher, loader, rows, precision, total), top_k, views)
        if main:
            stored = table.tensors() if isinstance(table, TopKLogits) else {"logits": table}
            probe = _probe_inputs(loader)
            save_tensors(path, {**stored, "probe_inputs": probe, "probe_outputs": _probe_outputs(teacher, probe)},
                         {"version": CACHE_VERSION, "preprocessing": preprocessing, "precision": precision,
                          "top_k": str(top_k)})
    return table, path, True


def _compact(logits: Tensor, top_k: int, views: int) -> Tensor | TopKLogits:
    """The table as stored: top-k, or fp16 for K views (half the bytes; 3 significant digits are ample
    for soft targets), or fp32; fp32 whenever a logit is beyond fp16's range."""
    if not logits.abs().max() < torch.finfo(torch.float16).max:
        return logits
    if top_k:
        return TopKLogits.of(logits, top_k)
    return logits.half() if views else logits


def _probe_inputs(loader, size: int = PROBE_SIZE) -> Tensor:
    """The first `size` inputs the loader yields.

    Real, preprocessed inputs rather than random ones: they exercise the teacher where its cached
    logits come from. They are stored in the entry, so checking it needs neither the loader nor a
    random stream (which differs between CPU and GPU generators and between torch versions).
    """
    taken, count = [], 0
    for batch in loader:
        inputs = unpack(batch)[0][:size - count]
        taken.append(inputs.detach().cpu())
        count += len(inputs)
        if count >= size:
            break
    return torch.cat(taken)


@torch.inference_mode()
def _probe_outputs(teacher: nn.Module, inputs: Tensor) -> Tensor:
    """The teacher's fp32 outputs (eval mode) on the probe inputs, run on its own device and dtype.

    TF32 is off meanwhile, so an entry built on a CPU checks out on a GPU (cuDNN convolutions use
    TF32 by default, which moves outputs by about 1e-3).
    """
    freeze(teacher)
    param = next(teacher.parameters(), None)
    if param is not None and param.is_floating_point():
        inputs = inputs.to(device=param.device, dtype=param.dtype)
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        return teacher(inputs).float().cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _read_entry(path: Path, teacher: nn.Module, num_samples: int) -> tuple[Tensor | TopKLogits | None, str]:
    """The cached logits, or None and why the entry cannot be trusted."""
    try:
        tensors = load_tensors(path)[0]
    except KdistillError:
        return None, "does not read back as safetensors"
    table_names = ("top_values", "top_classes", "tail_logsumexp") if "top_values" in tensors else ("logits",)
    missing = [k for k in (*table_names, "probe_inputs", "probe_outputs") if k not in tensors]
    if missing:
        return None, f"lacks {', '.join(missing)}"
    expected = tensors["probe_outputs"].float()
    if expected.ndim != 2:
        return None, f"holds probe outputs of shape {tuple(expected.shape)}"
    table, problem = _table(tensors, expected.shape[1])
    if table is None:
        return None, problem
    if table.shape[0] != num_samples:
        return None, f"holds a table of shape {tuple(table.shape)} for {num_samples} samples"
    try:
        outputs = _probe_outputs(teacher, tensors["probe_inputs"])
    except (RuntimeError, ValueError):
        return None, "holds probe inputs that do not fit the teacher"
    # A tolerance, not equality: the last bits of float outputs vary with the thread count.
    if outputs.shape != expected.shape or not torch.allclose(outputs, expected, rtol=1e-4, atol=1e-5):
        return None, ("is stale: the teacher no longer gives its stored outputs on the probe inputs "
                      "(same weights and config, so its code or a plain attribute changed)")
    return table, ""


def _table(tensors: dict[str, Tensor], classes: int) -> tuple[Tensor | TopKLogits | None, str]:
    """The entry's soft-label table (dense logits, or a top-k table), or None and what is wrong with it."""
    if "top_values" not in tensors:
        logits = tensors["logits"]
        if logits.ndim != 2 or logits.shape[1] != classes:
            return None, f"holds logits of shape {tuple(logits.shape)} for {classes} classes"
        if not torch.isfinite(logits).all():
            return None, "holds NaN or inf"
        return (logits if logits.dtype == torch.float16 else logits.float()), ""
    values, indices, tail = tensors["top_values"], tensors["top_classes"], tensors["tail_logsumexp"]
    if values.ndim != 2 or indices.shape != values.shape or tail.shape != values.shape[:1] \
            or not 0 < values.shape[1] < classes:
        return None, f"holds a top-k table of shape {tuple(values.shape)} for {classes} classes"
    if not (torch.isfinite(values).all() and torch.isfinite(tail).all()):
        return None, "holds NaN or inf"
    if indices.is_floating_point() or indices.min() < 0 or indices.max() >= classes:
        return None, f"holds class indices outside [0, {classes})"
    return TopKLogits(values, indices, tail, classes), ""


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- teacher features ------------------------------------------------------------------------------

def feature_file(cache_dir: Path, logits_key: str, path: str) -> Path:
    """Where the features of module `path` live, for the teacher and data of soft-label entry `logits_key`:
    one file per tapped module, so recipes that tap the same module share it."""
    key = hashlib.sha256(json.dumps([logits_key, "feature", path]).encode()).hexdigest()[:32]
    return cache_dir / f"{key}.npy"


def cached_teacher_features(teacher: nn.Module, loader, logits_key: str, taps: Sequence[str], num_samples: int,
                            cache_dir: Path | None = None, precision: str = "fp32", *, rebuild: bool = False,
                            log: Callable[[str], None] | None = None) -> tuple[dict[str, Tensor], list[Path], bool]:
    """The teacher's features at the tapped module paths for every training sample, from the cache or
    computed now in one pass of the teacher over `loader` (unshuffled, unaugmented, one process).

    Returns ({path: [N, ...] table}, files, built). Tables are fp16 (fp32 if a value is beyond fp16's
    range) `.npy` files, memory-mapped: a table larger than memory still works, read as batches need it.
    They are keyed by the soft-label entry `logits_key`, whose probe check vouches for the teacher:
    when that entry was rebuilt, pass `rebuild=True`.
    """
    log = log or _to_stderr
    cache_dir = check_cache_dir(cache_dir)
    files = [feature_file(cache_dir, logits_key, path) for path in taps]
    with exclusive_lock(cache_dir / f"{logits_key}.features.lock", "teacher-feature cache", wait=True, on_wait=log):
        for file in files:
            remove_stale_temporaries(cache_dir, recursive=False, name=file.name)
        if not rebuild:
            tables, problem = _read_features(files, num_samples)
            if tables is not None:
                return dict(zip(taps, tables, strict=True)), files, False
            if problem:
                log(f"teacher-feature cache entry {problem}: rebuilding it")
        for dtype in (np.float16, np.float32):  # fp32 only if a feature overflows fp16
            if _write_features(teacher, loader, taps, files, num_samples, precision, dtype):
                break
        tables, problem = _read_features(files, num_samples, scan=False)  # checked while written
        if tables is None:
            raise KdistillError(f"teacher-feature cache entry {problem} right after it was written: is "
                                f"{cache_dir} on a sound disk?")
    return dict(zip(taps, tables, strict=True)), files, True


@torch.inference_mode()
def _write_features(teacher: nn.Module, loader, taps: Sequence[str], files: list[Path], num_samples: int,
                    precision: str, dtype) -> bool:
    """Fill one memory-mapped file per tap; False (nothing kept) when a value overflows `dtype`."""
    freeze(teacher)
    device = device_of(teacher)
    hooks = FeatureTaps(teacher, taps)
    limit = float(np.finfo(dtype).max)
    try:
        with atomic_files(files) as temporaries:
            arrays = None
            filled = np.zeros(num_samples, dtype=np.int64)
            for batch in loader:
                inputs, _, index = unpack(batch)
                with autocast(precision, device):
                    teacher(inputs.to(device, non_blocking=True))
                features = hooks.pop()
                if arrays is None:
                    arrays = [np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype,
                                                        shape=(num_samples, *features[path].shape[1:]))
                              for tmp, path in zip(temporaries, taps, strict=True)]
                rows = index.cpu().numpy()
                for array, path in zip(arrays, taps, strict=True):
                    values = features[path].float()
                    if not torch.isfinite(values).all():
                        raise KdistillError(f"the teacher's features at {path} contain NaN or inf: check the "
                                            "teacher checkpoint")
                    if values.abs().max() >= limit:
                        raise _Overflow
                    array[rows] = values.contiguous().cpu().numpy().astype(dtype)
                np.add.at(filled, rows, 1)
            if arrays is None or not (filled == 1).all():
                raise ValueError("the loader did not give every training sample exactly once")
            for array in arrays:
                array.flush()
            del arrays
    except _Overflow:
        return False
    finally:
        hooks.remove()
    return True


class _Overflow(Exception):
    """A feature value beyond the storage dtype's range."""


def _read_features(files: list[Path], num_samples: int, scan: bool = True) -> tuple[list[Tensor] | None, str]:
    """Each file as a memory-mapped tensor, or None and what is wrong ("" when a file is simply missing);
    `scan` reads every value to refuse NaN and inf. Copy-on-write: nothing a training does can change the files."""
    tables = []
    for file in files:
        if not file.exists():
            return None, ""
        try:
            array = np.load(file, mmap_mode="c", allow_pickle=False)
        except (OSError, ValueError) as err:
            return None, f"{file} does not read back as an array ({err})"
        if array.dtype not in (np.float16, np.float32) or array.ndim < 2 or array.shape[0] != num_samples:
            return None, f"{file} holds {array.dtype} of shape {array.shape} for {num_samples} samples"
        table = torch.from_numpy(array)
        if scan and not all(torch.isfinite(table[start:start + 8192]).all()  # a chunk at a time: it may not fit
                            for start in range(0, num_samples, 8192)):
            return None, f"{file} holds NaN or inf"
        tables.append(table)
    return tables, ""
