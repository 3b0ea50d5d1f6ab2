"""Process-wide runtime settings, importable without torch (the CLI applies them at start-up)."""
from __future__ import annotations

import ctypes
import os

__all__ = ["apply_cli_defaults", "keep_freed_memory"]


def keep_freed_memory() -> bool:
    """Opt-in, process-wide: ask glibc to keep freed memory for reuse instead of returning it.

    Every forward allocates tens of MB of activations; by default glibc trims the freed top of
    the heap back to the OS, and the next forward faults the same pages in again, one 4 KiB page
    at a time (~2 us each on a VM: 10-30k faults, ~30% of a VideoMamba-Ti forward on 2 threads;
    bench/encoder.py measures it). After this call the process stays at its peak RSS instead.
    Same as ``MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_MMAP_THRESHOLD_=33554432`` in the
    environment. Returns False where it does not apply (not glibc).
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and ok   # 32 MiB: glibc's largest


def apply_cli_defaults() -> None:
    """What the ``vtr`` command sets before any work: :func:`keep_freed_memory` unless
    ``VTR_KEEP_FREED_MEMORY=0``. A CLI process runs one job and exits, so holding its peak
    resident memory costs nothing, while trimming it would fault the same pages in on every
    forward pass (bench/encoder.py: 0.31 -> 0.24 s per VideoMamba-Ti clip)."""
    if os.environ.get("VTR_KEEP_FREED_MEMORY", "1") != "0":
        keep_freed_memory()
