"""kdistill.storage: atomic writes that survive kills, their leftovers, and locks between processes."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from kdistill.errors import KdistillError
from kdistill.storage import atomic_write_text, exclusive_lock, remove_stale_temporaries
from kdistill.train.checkpoint import load_tensors, save_tensors


def python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], text=True, **kwargs)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_permissions_of_a_normal_open(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "summary.json", "{}")
        save_tensors(tmp_path / "model.safetensors", {"w": torch.ones(2)})
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("{}")
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode) == expected
    assert stat.S_IMODE(os.stat(tmp_path / "summary.json").st_mode) == expected
    assert stat.S_IMODE(os.stat(tmp_path / "model.safetensors").st_mode) == expected


def test_the_folder_is_flushed_after_the_rename(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_text(tmp_path / "metrics.json", "{}")
    assert synced == [False, True]  # the file's data, then the folder holding the new name


def test_a_kill_during_a_write_keeps_the_previous_version(tmp_path):
    target = tmp_path / "model.safetensors"
    child = python(f"""
        import os, signal, torch
        from kdistill.storage import atomic_write
        from kdistill.train.checkpoint import save_tensors
        save_tensors({str(target)!r}, {{"w": torch.arange(4.0)}})

        def killed_halfway(tmp):
            with open(tmp, "wb") as handle:
                handle.write(b"\\x08\\x00\\x00\\x00")  # the start of a safetensors header
                handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        atomic_write({str(target)!r}, killed_halfway)
    """)
    assert child.wait(timeout=120) == -signal.SIGKILL
    tensors, _ = load_tensors(target)
    assert torch.equal(tensors["w"], torch.arange(4.0))
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".model.safetensors.")
    assert leftovers[0].name.endswith(".tmp")
    assert remove_stale_temporaries(tmp_path) == leftovers
    assert list(tmp_path.iterdir()) == [target]


def test_only_our_own_temporaries_are_removed(tmp_path):
    ours = [tmp_path / ".model.safetensors.a1b2c3d4.tmp", tmp_path / ".summary.json.x_9kq0zz.tmp"]
    nested = tmp_path / "teacher" / ".metrics.jsonl.0f0f0f0f.tmp"
    theirs = [tmp_path / "notes.tmp", tmp_path / ".vimrc.tmp", tmp_path / ".model.safetensors.short.tmp",
              tmp_path / ".model.safetensors.a1b2c3d4.tmp.bak", tmp_path / "model.safetensors"]
    (tmp_path / "teacher").mkdir()
    (tmp_path / ".folder.abcdefgh.tmp").mkdir()  # named like one, but a folder
    for path in [*ours, nested, *theirs]:
        path.write_text("x")
    assert remove_stale_temporaries(tmp_path, recursive=False, name="summary.json") == [ours[1]]
    assert remove_stale_temporaries(tmp_path, recursive=False) == [ours[0]]
    assert remove_stale_temporaries(tmp_path) == [nested]
    assert all(path.exists() for path in theirs) and (tmp_path / ".folder.abcdefgh.tmp").is_dir()
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_a_lock_names_its_holder_and_conflicts_within_one_process(tmp_path):
    lock = tmp_path / "run.lock"
    with exclusive_lock(lock, "run folder runs/demo"):
        assert lock.read_text().strip() == str(os.getpid())
        with pytest.raises(KdistillError, match=rf"^run folder runs/demo is in use by another kdistill process "
                                                rf"\(PID {os.getpid()}\); wait for it"):
            with exclusive_lock(lock, "run folder runs/demo"):
                pass
    with exclusive_lock(lock, "run folder runs/demo"):  # released at the end of the block
        pass
    assert lock.exists()  # never deleted: see exclusive_lock


def hold_lock(lock, seconds: float) -> subprocess.Popen:
    child = python(f"""
        import time
        from kdistill.storage import exclusive_lock
        with exclusive_lock({str(lock)!r}, "the cache"):
            print("locked", flush=True)
            time.sleep({seconds})
    """, stdout=subprocess.PIPE)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_killed_holder_releases_its_lock(tmp_path):
    lock = tmp_path / "cache.lock"
    child = hold_lock(lock, 600)
    try:
        with pytest.raises(KdistillError, match=rf"PID {child.pid}\)"):
            with exclusive_lock(lock, "the cache"):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    with exclusive_lock(lock, "the cache"):
        pass


def test_waiting_for_a_lock_says_who_holds_it_once(tmp_path):
    lock = tmp_path / "cache.lock"
    child = hold_lock(lock, 1.0)
    lines, started = [], time.monotonic()
    with exclusive_lock(lock, "the cache", wait=True, on_wait=lines.append):
        waited = time.monotonic() - started
        assert lock.read_text().strip() == str(os.getpid())
    child.wait(timeout=60)
    assert waited > 0.5  # blocked until the holder was done, about a second
    assert len(lines) == 1 and f"PID {child.pid}" in lines[0] and "\n" not in lines[0]
    lines.clear()
    with exclusive_lock(lock, "the cache", wait=True, on_wait=lines.append):
        pass
    assert lines == []  # a free lock is taken silently


def test_a_lock_in_an_unwritable_place_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(KdistillError, match=r"^cannot create the lock file .*file/x\.lock for the cache \("):
        with exclusive_lock(tmp_path / "file" / "x.lock", "the cache"):
            pass
