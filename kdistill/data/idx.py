"""Reader for the IDX format that MNIST-style data sets ship in (http://yann.lecun.com/exdb/mnist/).

Layout: two zero bytes, a type byte, the number of dimensions, then one big-endian
uint32 per dimension, then the raw values. Only unsigned bytes (type 0x08) occur in
the image data sets we load, so that is all we accept.
"""

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from kdistill.errors import KdistillError

_UINT8 = 0x08


def find_idx(directory: Path, name: str) -> Path | None:
    """Return ``directory/name`` or ``directory/name.gz``, whichever exists (plain first)."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (gzipped if its name ends in .gz) into a uint8 tensor of the header's shape."""
    fix = "delete it and download it again"
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise KdistillError(f"{path}: cannot read ({exc}); {fix}") from exc

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise KdistillError(f"{path}: not an IDX file (bad magic number); {fix}")
    if raw[2] != _UINT8:
        raise KdistillError(f"{path}: IDX value type 0x{raw[2]:02x} is not supported (only uint8, 0x08); "
                            "use an MNIST-style image file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise KdistillError(f"{path}: truncated or corrupt IDX header; {fix}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise KdistillError(f"{path}: truncated or corrupt IDX file (header says {expected} bytes, "
                            f"found {len(raw)}); {fix}")
    # Copy so the tensor owns writable memory instead of aliasing the immutable bytes.
    values = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()
    return torch.from_numpy(values)
