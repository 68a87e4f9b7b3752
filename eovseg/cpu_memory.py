"""Reuse of freed memory between forward passes on CPU.

glibc serves every allocation above 32 MiB (the ceiling of its adaptive threshold) with a fresh `mmap` and unmaps it
on free, so the kernel hands out and zeroes those pages again at their first touch in the next call. A forward pass
of the R50 variant on a 640x960 image allocates about 2.4 GB in such blocks: about 600,000 page faults and 1 s of
system time per image on a 2-core CPU, more than a third of the pass. With `mmap` off for allocations and the trim
threshold raised, freed blocks stay in the process and the next pass reuses them (as PyTorch's GPU caching allocator
does). The numbers are unchanged.

Kept memory is bounded: images of changing sizes leave holes that later blocks do not fit (even a block of the
same size may miss its old hole by the few bytes an aligned allocation adds, once a small allocation sits beside
it), so the heap would keep growing (3.6 to 7.6 GiB over 40 R50 calls at 640 x 640-1152). Before each pass
`release_if_grown` compares the process's resident set with what it was after the first pass since the last
release; beyond 1.25 times that, it returns the free pages to the system (`malloc_trim`; the next pass faults them
in again) and measures anew.

The model calls `reuse_freed_memory` at the start of each forward pass on CPU (the setting is applied once per
process; later calls check the growth), on Linux with glibc. `EOVSEG_CPU_MEMORY_REUSE=0` in the environment leaves
malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["reuse_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
GROWTH_LIMIT = 1.25  # resident memory allowed, as a multiple of what it was after the first pass since a release


class _Glibc:
    def __init__(self):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        self.mallopt, self.malloc_trim = libc.mallopt, libc.malloc_trim
        libc.gnu_get_libc_version  # glibc only: mallopt's parameter numbers differ elsewhere
        self.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        self.malloc_trim.argtypes = [ctypes.c_size_t]
        self.baseline: int | None = None  # resident bytes after the first pass since the last release


def resident_bytes() -> int:
    """The process's resident set (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_glibc: _Glibc | None = None
_decided = False


def reuse_freed_memory() -> bool:
    """Keep freed memory in the process for later allocations, bounded (see the module's docstring). Called at the
    start of each forward pass on CPU: applies the setting once, then bounds what the process keeps.
    Returns whether the setting is in effect (False off Linux/glibc or with `EOVSEG_CPU_MEMORY_REUSE=0`)."""
    global _glibc, _decided
    if not _decided:
        _decided = True
        _glibc = _apply()
    elif _glibc is not None:
        release_if_grown()
    return _glibc is not None


def _apply() -> _Glibc | None:
    if os.environ.get("EOVSEG_CPU_MEMORY_REUSE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        glibc = _Glibc()
        resident_bytes()
    except (OSError, AttributeError, ValueError):
        return None
    # -1: never trim the heap (mallopt(3)); 0: no mmap for allocations, so they come from the reusable heap
    if glibc.mallopt(_M_TRIM_THRESHOLD, -1) and glibc.mallopt(_M_MMAP_MAX, 0):
        return glibc
    return None


def release_if_grown() -> bool:
    """Return the process's free memory to the system if its resident set grew past `GROWTH_LIMIT` times what it was
    after the first pass since the last release (the first call after a release measures anew). Returns whether it
    released."""
    if _glibc is None:
        return False
    resident = resident_bytes()
    if _glibc.baseline is None:
        _glibc.baseline = resident
        return False
    if resident <= GROWTH_LIMIT * _glibc.baseline:
        return False
    _glibc.malloc_trim(0)
    _glibc.baseline = None
    return True
