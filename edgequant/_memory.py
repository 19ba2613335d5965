"""Process-wide memory setting for the ``edgequant export`` command (the library leaves the process alone).

glibc serves large blocks from its heap once their size has been freed a few times (its mmap threshold grows
up to 32 MiB), and a heap fragmented by batch after batch of activations does not shrink: peak memory then
grows with the number of samples although each stage holds one batch. A fixed threshold keeps every block of
64 KiB and more in its own mapping, returned to the system when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
_THRESHOLD = 64 * 1024


def release_freed_buffers() -> bool:
    """Fix glibc's mmap threshold (Linux only) → whether it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        log.debug("mallopt not available; large buffers stay in the heap")
        return False
