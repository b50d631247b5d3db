"""Checksummed file download over plain urllib (no extra dependencies)."""

import hashlib
import os
import tempfile
from pathlib import Path
from urllib.request import urlopen

from kdistill.errors import KdistillError

TIMEOUT_S = 30.0


def fetch(url: str, dest: Path, md5: str, timeout: float = TIMEOUT_S) -> None:
    """Download `url` to `dest` if its MD5 matches; otherwise leave nothing behind.

    Writes to a temporary file beside `dest` and renames it, so an interrupted download
    never looks like a complete file. Network failures propagate as OSError (URLError,
    timeouts) for the caller to explain; a checksum mismatch raises KdistillError.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise KdistillError(f"{url}: checksum mismatch (got MD5 {digest.hexdigest()}, expected {md5}); "
                                f"retry, or place a good copy at {dest}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
