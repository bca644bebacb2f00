"""Process-wide memory behaviour shared by training and the merge (imports nothing heavy)."""

from __future__ import annotations

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory instead of handing it back to the kernel.

    On CPU, every training step (and every chunk of a TIES or DARE merge) allocates and frees
    the same large tensors. By default glibc serves each from a fresh ``mmap`` and unmaps it on free, so the
    kernel zeroes and faults in every page again: measured here, a branch spent 20% of
    its time in the kernel, and two branches side by side slowed each other down through it.
    Keeping freed memory in the heap (up to glibc's 32 MiB mmap cap, never trimmed) makes that
    time vanish; the process's peak memory is unchanged. A no-op where glibc is absent.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        # The symbols already loaded in this process: its own malloc, no library search.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # 32 MiB: glibc's maximum on 64-bit
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    ok &= mallopt(_M_TOP_PAD, 256 << 20)
    return bool(ok)
