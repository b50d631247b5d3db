"""`image_folder`: a folder of images, one sub-folder per class (seed 002's Flowers layout).

    root/<class>/<image>                      the test split is carved per class, with a fixed seed
    root/train/<class>/<image> + root/test/<class>/<image>    the two splits as given

Any format Pillow reads. Each image is turned upright (EXIF), converted to RGB or greyscale
("L"; transparent pixels keep their colour values), and resized to `image_size` x
`image_size` (bicubic, aspect ratio not kept: crop your images first if it matters). The
decoded uint8 tensors are cached in a safetensors file keyed by the files' names, sizes and
times and the shape asked for, so a later run reads one file instead of decoding thousands.
"""

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kdistill.data.registry import DataRequest, LoadedData, register_dataset, split_count
from kdistill.data.sets import ImageSet
from kdistill.errors import KdistillError
from kdistill.storage import atomic_write

FORMAT = "kdistill-image-folder-1"
TEST_SEED = 20_251_123  # the carve of the test split never moves, whatever split_seed says
NAMED_SKIPS = 10  # unreadable files named one by one; the rest are counted
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def cache_dir() -> Path:
    """$KDISTILL_IMAGE_CACHE, else ~/.cache/kdistill/images."""
    return Path(os.environ.get("KDISTILL_IMAGE_CACHE", "~/.cache/kdistill/images")).expanduser()


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_files(split_root: Path) -> dict[str, list[Path]]:
    """Class name -> the files in its folder (recursively), both sorted; hidden files ignored."""
    folders = sorted(p for p in split_root.iterdir() if p.is_dir() and _visible(p))
    if not folders:
        raise KdistillError(f"{split_root} holds no class folders: lay images out as {split_root}/<class>/<image> "
                            "(one sub-folder per class)")
    classes = {}
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and _visible(p)
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        if not files:
            raise KdistillError(f"class folder {folder} holds no images: add images to it or remove it")
        classes[folder.name] = files
    return classes


def _layout(root: Path) -> tuple[dict[str, list[Path]], dict[str, list[Path]] | None]:
    """(train classes, test classes or None when the test split is to be carved)."""
    if not root.is_dir():
        raise KdistillError(f"data.root {root} is not a folder: image_folder needs a folder of class folders")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = _class_files(root / "train"), _class_files(root / "test")
        unknown = sorted(set(test) - set(train))
        if unknown:
            raise KdistillError(f"{root / 'test'} has classes that {root / 'train'} lacks ({', '.join(unknown[:5])}); "
                                "every test class needs training images")
        return train, test
    return _class_files(root), None


def _key(root: Path, files: list[Path], request: DataRequest) -> str:
    digest = hashlib.sha256(json.dumps([FORMAT, request.channels, request.image_size, request.test_size]).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _open(path: Path, size: int | None) -> Image.Image:
    image = Image.open(path)
    if size is not None and image.format == "JPEG":
        image.draft("RGB" if image.mode != "L" else "L", (size, size))  # decode at a reduced scale: much faster
    return ImageOps.exif_transpose(image)


def _probe(path: Path) -> tuple[tuple[int, int], str] | None:
    """(size, mode) from the header, or None if Pillow cannot read the file."""
    try:
        with Image.open(path) as image:
            return image.size, image.mode
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def _decode(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray | None:
    try:
        with _open(path, max(size)) as image:
            image = image.convert(mode)
            if image.size != size:
                image = image.resize(size, Image.Resampling.BICUBIC)
            pixels = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None  # truncated or damaged: counted with the unreadable ones
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _decode_all(files: list[Path], request: DataRequest) -> tuple[torch.Tensor, list[Path], list[Path]]:
    """uint8 [N, C, S, S] for the readable files, those files, and the files skipped."""
    workers = min(32, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # Pillow releases the GIL while decoding
        headers = list(pool.map(_probe, files))
    readable = [(path, header) for path, header in zip(files, headers, strict=True) if header is not None]
    skipped = [path for path, header in zip(files, headers, strict=True) if header is None]
    if not readable:
        raise KdistillError(f"none of the {len(files)} files under data.root could be read as an image by Pillow")
    channels = request.channels or (1 if all(mode in GREY_MODES for _, (_, mode) in readable) else 3)
    if request.image_size is not None:
        size = (request.image_size, request.image_size)
    else:
        sizes = {header[0] for _, header in readable}
        if len(sizes) > 1:
            examples = {}
            for path, (found, _) in readable:
                examples.setdefault(found, path)
            (a, pa), (b, pb) = list(examples.items())[:2]
            raise KdistillError(f"images have different sizes ({a[0]}x{a[1]} in {pa}, {b[0]}x{b[1]} in {pb}); "
                                "set data.image_size=N to resize them all to N x N")
        size = sizes.pop()
    mode = "L" if channels == 1 else "RGB"
    with ThreadPoolExecutor(workers) as pool:
        pixels = list(pool.map(lambda path: _decode(path, mode, size), [path for path, _ in readable]))
    decoded = [(path, p) for (path, _), p in zip(readable, pixels, strict=True) if p is not None]
    skipped += [path for (path, _), p in zip(readable, pixels, strict=True) if p is None]
    if not decoded:
        raise KdistillError(f"none of the {len(files)} files under data.root could be decoded by Pillow")
    images = torch.from_numpy(np.stack([p for _, p in decoded])).permute(0, 3, 1, 2).contiguous()
    return images, [path for path, _ in decoded], skipped


def _carve_test(labels: torch.Tensor, test_size: int | float) -> torch.Tensor:
    """A boolean mask of test samples: `test_size` of each class (at least one of a class with two or more)."""
    generator = torch.Generator().manual_seed(TEST_SEED)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        if len(members) < 2:
            continue
        count = min(split_count(test_size, len(members)), len(members) - 1)
        mask[members[torch.randperm(len(members), generator=generator)[:count]]] = True
    return mask


def _build(root: Path, train_classes: dict[str, list[Path]], test_classes: dict[str, list[Path]] | None,
           request: DataRequest) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    classes = list(train_classes)
    if len(classes) < 2:
        raise KdistillError(f"{root} holds a single class folder ({classes[0]}); classification needs at least two")
    entries = [(path, label, "train") for label, name in enumerate(classes) for path in train_classes[name]]
    if test_classes is not None:
        entries += [(path, classes.index(name), "test") for name, paths in test_classes.items() for path in paths]
    images, kept, skipped = _decode_all([path for path, _, _ in entries], request)
    where = {path: (label, split) for path, label, split in entries}
    labels = torch.tensor([where[path][0] for path in kept], dtype=torch.int64)
    is_test = torch.tensor([where[path][1] == "test" for path in kept], dtype=torch.bool)
    for label, name in enumerate(classes):
        if not bool(((labels == label) & ~is_test).any()):
            raise KdistillError(f"class folder {name} under {root} holds no readable training images: add images "
                                "to it or remove it")
    if test_classes is None:
        is_test = _carve_test(labels, request.test_size)
    tensors = {"train_images": images[~is_test], "train_labels": labels[~is_test],
               "test_images": images[is_test], "test_labels": labels[is_test]}
    return tensors, classes, [str(path) for path in skipped]


def _warn_skipped(skipped: list[str], total: int) -> None:
    for path in skipped[:NAMED_SKIPS]:
        warnings.warn(f"skipped {path}: Pillow cannot read it as an image", stacklevel=3)
    if skipped:
        more = f" ({len(skipped) - NAMED_SKIPS} more not named above)" if len(skipped) > NAMED_SKIPS else ""
        warnings.warn(f"skipped {len(skipped)} of {total:,} files that Pillow cannot read{more}", stacklevel=3)


@register_dataset("image_folder", "your images: data.root/<class>/<image> (or train/ and test/ inside), any format")
def load_image_folder(request: DataRequest) -> LoadedData:
    if request.root is None:
        raise KdistillError("data set 'image_folder' needs data.root: the folder that holds one folder per class")
    root = request.root.resolve()
    train_classes, test_classes = _layout(root)
    files = [path for group in (train_classes, test_classes or {}) for paths in group.values() for path in paths]
    path = cache_dir() / f"{_key(root, files, request)}.safetensors"
    cached = _read_cache(path)
    if cached is None:
        tensors, classes, skipped = _build(root, train_classes, test_classes, request)
        metadata = {"format": FORMAT, "classes": json.dumps(classes), "skipped": json.dumps(skipped),
                    "root": str(root)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    else:
        tensors, classes, skipped = cached
    _warn_skipped(skipped, len(files))
    train = ImageSet(tensors["train_images"], tensors["train_labels"])
    test = ImageSet(tensors["test_images"], tensors["test_labels"])
    origin = "read from the cache" if cached is not None else "decoded now"
    return LoadedData(train, test, classes, sources=[f"{root} ({len(files):,} files)", f"{path} ({origin})"])


def _read_cache(path: Path) -> tuple[dict[str, torch.Tensor], list[str], list[str]] | None:
    """The cached decode, or None if there is none or it is damaged (then it is decoded again)."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        classes, skipped = json.loads(metadata["classes"]), json.loads(metadata["skipped"])
        ImageSet(tensors["train_images"], tensors["train_labels"])  # the shapes and dtypes hold together
        ImageSet(tensors["test_images"], tensors["test_labels"])
        if metadata.get("format") != FORMAT:
            raise ValueError("another format")
    except (SafetensorError, OSError, ValueError, KeyError, KdistillError) as error:
        warnings.warn(f"image cache {path} is damaged ({type(error).__name__}); decoding the images again",
                      stacklevel=3)
        return None
    return tensors, classes, skipped
