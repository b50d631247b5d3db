"""Reader for the IDX format that MNIST-style data sets ship in (http://yann.lecun.com/exdb/mnist/).

Layout: two zero bytes, a type byte, the number of dimensions, then one big-endian
uint32 per dimension, then the raw values. Only unsigned bytes (type 0x08) occur in
the image data sets we load, so that is all we accept.
"""

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from kdistill.errors import KdistillError
from kdistill.memory import available_memory

_UINT8 = 0x08
# Deflate cannot expand data more than about 1032:1, so a .gz file whose header promises more
# than this many bytes per compressed byte is lying (or a decompression bomb).
MAX_GZIP_RATIO = 1100
_CHUNK = 1 << 20


def find_idx(directory: Path, name: str) -> Path | None:
    """Return ``directory/name`` or ``directory/name.gz``, whichever exists (plain first)."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (gzipped if its name ends in .gz) into a uint8 tensor of the header's shape.

    Streams the file: the header says how many bytes follow, at most that many are read (so a
    gzip bomb is never inflated), and a header that promises more than the file can hold or
    the machine can store is refused before anything is allocated.
    """
    fix = "delete it and download it again"
    gz = path.suffix == ".gz"
    try:
        size = path.stat().st_size
        with gzip.open(path, "rb") if gz else path.open("rb") as stream:
            magic = stream.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
                raise KdistillError(f"{path}: not an IDX file (bad magic number); {fix}")
            if magic[2] != _UINT8:
                raise KdistillError(f"{path}: IDX value type 0x{magic[2]:02x} is not supported (only uint8, 0x08); "
                                    "use an MNIST-style image file")
            ndim = magic[3]
            dims = stream.read(4 * ndim)
            if ndim == 0 or len(dims) < 4 * ndim:
                raise KdistillError(f"{path}: truncated or corrupt IDX header; {fix}")
            shape = struct.unpack(f">{ndim}I", dims)
            count = math.prod(shape)  # a Python int: no overflow, however many dimensions
            _check_plausible(path, count, 4 + 4 * ndim, size, gz, fix)
            values = np.empty(count, dtype=np.uint8)
            filled = _read_into(stream, memoryview(values))
            if filled < count:
                raise KdistillError(f"{path}: truncated IDX file (header says {count} values, found {filled}); {fix}")
            if stream.read(1):  # also makes gzip check its CRC and length trailer
                raise KdistillError(f"{path}: corrupt IDX file (data goes on past the {count} values its header "
                                    f"says); {fix}")
    except (OSError, EOFError, zlib.error) as exc:
        raise KdistillError(f"{path}: cannot read ({exc}); {fix}") from exc
    return torch.from_numpy(values.reshape(shape))


def _check_plausible(path: Path, count: int, header: int, size: int, gz: bool, fix: str) -> None:
    """Refuse, before allocating, a header that promises more values than the file or the machine can hold."""
    if not gz and header + count != size:
        kind = "truncated" if header + count > size else "corrupt"
        raise KdistillError(f"{path}: {kind} IDX file (header says {header + count} bytes, the file has {size}); {fix}")
    if gz and count > MAX_GZIP_RATIO * size:
        raise KdistillError(f"{path}: corrupt IDX file (header says {count} values, more than a {size}-byte gzip "
                            f"file can hold); {fix}")
    available = available_memory()
    if available is not None and count > available:
        raise KdistillError(f"{path}: IDX header says {count} values, more than the {available} bytes of memory "
                            "available; free memory or use a smaller data set")


def _read_into(stream, buffer: memoryview) -> int:
    """Fill `buffer` from `stream` in chunks; return how many bytes arrived (fewer at end of file)."""
    filled = 0
    while filled < len(buffer):
        n = stream.readinto(buffer[filled:filled + _CHUNK])
        if not n:
            break
        filled += n
    return filled
