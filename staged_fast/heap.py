"""Give freed heap memory back to the OS.

glibc keeps small and mid-sized freed blocks (below its dynamic mmap threshold, up to 32 MiB) in the
process heap, so after a tensor is freed the resident set does not shrink and a later allocation may
grow the heap elsewhere. Growth frees each old tensor as soon as its grown copy exists; trimming after
each one keeps the peak resident set within the documented bound with the default allocator.
"""
import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim  # glibc only; musl and macOS have none
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """malloc_trim(0): True when the C library supports it (glibc), else a no-op returning False."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
