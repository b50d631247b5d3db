"""How much memory the machine can still give, to refuse absurd allocations before making them."""

import os


def available_memory() -> int | None:
    """Bytes of memory that can be allocated without swapping or the OOM killer; None where the platform cannot say.

    On Linux this is MemAvailable, which counts reclaimable page cache: the free-page count
    (SC_AVPHYS_PAGES) alone can be tiny on a machine that just read a lot of files.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name (macOS)
        return None
