"""Files that survive crashes and concurrent runs: atomic writes, leftovers of killed writers, locks.

A file appears under its final name only once it is complete: it is written to a temporary file
`.{name}.XXXXXXXX.tmp` in the same folder, flushed, renamed, and the folder is flushed too, so the
rename itself survives a power cut. A process killed mid-write leaves only such a temporary,
which `remove_stale_temporaries` recognises and deletes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kdistill.errors import KdistillError

# Our temporaries and nothing else: a dot, the final name, 8 random characters ([a-z0-9_] also
# matches those of older kdistill versions, which used tempfile.mkstemp), ".tmp".
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


def _create_temporary(path: Path) -> tuple[Path, int]:
    """Create an empty temporary next to `path`; returns it and the permissions open() gives new files.

    Created with mode 0666, so the umask and the folder's default ACL apply as to any new file
    (mkstemp's 0600 would make checkpoints unreadable to the rest of a team). Reading the mode back
    spares us the umask, which can only be read by changing it, a race with other threads.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable; some platforms and file systems cannot, which we accept."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call `write(tmp_path)`, then rename the temporary file onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _create_temporary(path)
    try:
        write(str(tmp))
        with open(tmp, "rb+") as handle:
            os.fchmod(handle.fileno(), mode)  # writers may recreate the file: safetensors makes it 0600
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


@contextmanager
def atomic_files(paths: list[Path]) -> Iterator[list[Path]]:
    """Temporaries for several files written together (in one pass over data, say): each is renamed onto
    its final name, flushed, when the block ends without an error, and removed otherwise. A kill while
    renaming can leave only some of them final; readers must check that all are there."""
    paths = [Path(p) for p in paths]
    created: list[tuple[Path, int]] = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            created.append(_create_temporary(path))
        yield [tmp for tmp, _ in created]
        for (tmp, mode), path in zip(created, paths, strict=True):
            with open(tmp, "rb+") as handle:
                os.fchmod(handle.fileno(), mode)
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in created:
            tmp.unlink(missing_ok=True)
        raise
    for folder in {path.parent for path in paths}:
        _fsync_folder(folder)


def remove_stale_temporaries(folder: Path, recursive: bool = True, *, name: str | None = None) -> list[Path]:
    """Delete the temporaries that killed writers left in `folder`; returns what was removed.

    Only files named like our own temporaries are touched (of the file `name` alone, if given).
    A live writer's temporary looks the same: call this only where no other process can be
    writing, e.g. while holding the lock that guards those files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")):
        match = _TEMPORARY.fullmatch(path.name)
        if match and (name is None or match["name"] == name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextmanager
def exclusive_lock(path: Path, what: str, *, wait: bool = False,
                   on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) for the `with` block.

    `what` names the guarded thing in messages. If another process (or another `with` block of
    this one) holds it: with wait=False a KdistillError naming the holder's PID, with wait=True
    one line to `on_wait`, then wait until it is free. flock locks die with their process, so a
    killed run never leaves a lock behind; the file itself stays (deleting it would let two
    processes lock two different files of one name).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a lock file planted as a symbolic link must not make us truncate what it points to.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as err:
        if path.is_symlink():
            raise KdistillError(f"the lock file {path} for {what} is a symbolic link; delete the link "
                                "(kdistill never follows links to files it writes)") from None
        raise KdistillError(f"cannot create the lock file {path} for {what} ({err.strerror or err}); "
                            "make its folder writable or point kdistill to another one") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if not wait:
                raise KdistillError(f"{what} is in use by another kdistill process (PID {holder}); "
                                    "wait for it to finish or stop it") from None
            if on_wait is not None:
                on_wait(f"{what} is in use by another kdistill process (PID {holder}); waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # so that nobody names us as the holder once we are gone
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    # The holder writes its PID just after locking: an empty file means it has not done so yet.
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return text if text.isdigit() else "unknown"


def file_digest(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
