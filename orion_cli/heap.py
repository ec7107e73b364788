"""Large temporary arrays and glibc's heap: give freed memory back to the system.

glibc serves an allocation below its mmap threshold from the heap, and raises
that threshold (up to 32 MiB) each time a larger block is freed, so a run that
makes and frees many arrays of a few MiB, one layer after another (quantizing
with several candidate formats per tensor), leaves them in a heap it cannot
shrink: the resident set grows with depth though nothing is kept. Measured on
a 12-layer, 291 MB model with q4's three formats (peak resident set, time):

  glibc's default             1073 MiB (3 layers: 891)   45 s
  threshold fixed at 64 KiB    763 MiB (3 layers: 740)   60 s: every array a fresh mapping, zeroed
  threshold fixed at 4 MiB     858 MiB (3 layers: 775)   48 s: GPTQ's lazy batches stay in the heap
  malloc_trim after each layer 997 MiB (3 layers: 843)   48 s
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h); setting it also stops the dynamic raising
THRESHOLD_BYTES = 4 * 1024 * 1024


def return_large_blocks_to_the_system() -> bool:
    """Serve allocations of 4 MiB and more from mmap, so each is unmapped when freed (glibc only)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator does as it does
        log.debug("mallopt is not available; the heap is left as it is")
        return False
