"""The CPU memory allocator setting of a neurocl process: keep freed memory for the next batch.

A training step on the CPU allocates the same large tensors again and again (a batch of 32 float32
patches of 96^3 is 113 MB, and every view op makes another). glibc's ``malloc`` serves any block
over 32 MB with a fresh ``mmap`` and hands it back to the kernel on ``free``, so each new batch is
faulted in page by page: copying a batch into a fresh tensor took 0.09 s against 0.012 s into a
reused one, and the patch gather ran about 6x slower (docs/benchmarks.md, "Patches"). Telling glibc to
serve large blocks from its heap and never trim it (``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` at
its maximum; what ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` do from the environment) turns
the next batch into a reuse of the last one's pages. The process then keeps its peak memory until it
exits, which a training or embedding run does anyway. Numbers and results do not change (the
separation bench gave identical scores with and without).

The ``neurocl`` command applies it at start; Python users who want it call
:func:`keep_freed_memory` before their first large tensor. ``NEUROCL_KEEP_FREED_MEMORY=0`` turns it
off; it is skipped where malloc is not glibc's (macOS, Windows, musl) or where the user already
chose (``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` set, or a malloc preloaded with
``LD_PRELOAD``, e.g. jemalloc or tcmalloc, which cache freed memory themselves).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory", "describe_allocator", "OPT_OUT"]

OPT_OUT = "NEUROCL_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int; the largest one means "never give the heap top back"
_USER_CHOICES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
_state = {"applied": False, "outcome": "not asked"}


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it; musl's mallopt is a no-op
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> str:
    """Tell glibc's malloc to keep freed memory for reuse; returns what was done, in words.

    ``"applied"``, ``"already applied"``, or why it was skipped (``"off: NEUROCL_KEEP_FREED_MEMORY=0"``,
    ``"skipped: MALLOC_MMAP_MAX_ is set"``, ``"skipped: not glibc"``...). Never raises: the setting
    only changes speed.
    """
    if _state["applied"]:
        return "already applied"
    _state["outcome"] = outcome = _apply()
    _state["applied"] = outcome == "applied"
    return outcome


def describe_allocator() -> str:
    """The allocator setting of this process in words, for the benchmarks' machine line."""
    if _state["applied"]:
        return "malloc keeps freed memory"
    return f"malloc as it was ({_state['outcome']})"


def _apply() -> str:
    if os.environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"off: {OPT_OUT}={os.environ[OPT_OUT]}"
    chosen = [name for name in _USER_CHOICES if os.environ.get(name)]
    if chosen:
        return f"skipped: {chosen[0]} is set"
    # jemalloc, tcmalloc, mimalloc...: their own caches replace glibc's malloc altogether.
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return "skipped: an allocator is preloaded (LD_PRELOAD)"
    libc = _glibc()
    if libc is None:
        return "skipped: not glibc"
    # mallopt returns 1 on success.
    if libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) != 1 or libc.mallopt(_M_MMAP_MAX, 0) != 1:
        return "skipped: mallopt refused"
    return "applied"
