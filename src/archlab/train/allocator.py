"""Host allocator setting for CPU training: glibc keeps freed tensor memory for the next step.

Why: glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and unmaps it on free, so each training step page-faults all of its large tensors in
again. At the default compare's shapes the logits, their log-softmax and its gradient are
16 x 128 x 4,096 floats = 32 MiB each: head + cross-entropy forward and backward took 100 ms
with glibc's default and 48 ms with this setting, and a dense nano step 82.6 -> 70.5 us per
token (2 threads). PyTorch's CPU tuning guide preloads jemalloc or tcmalloc for the same reason;
this gets the effect without a preload: ``mallopt(M_MMAP_MAX, 0)`` serves every allocation from
the heap, and ``M_TRIM_THRESHOLD`` keeps up to 1 GiB of freed memory at the heap's top instead of
returning it to the system at once.

Applied by the ``archlab train`` command (a process that only trains; compare runs each
architecture as one), not by library use of the Trainer, whose process may want its memory
back. Left alone where it would override a choice or does not apply: not Linux with glibc, a
malloc tunable set (``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``, ... or
``GLIBC_TUNABLES``), jemalloc/tcmalloc/mimalloc in ``LD_PRELOAD``, or ``ARCHLAB_MALLOC=system``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
KEEP_FREED_BYTES = 1 << 30

_applied: bool | None = None


USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                 "MALLOC_TOP_PAD_")  # fmt: skip


def _reason_to_skip() -> str | None:
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.environ.get("ARCHLAB_MALLOC", "").strip().lower() == "system":
        return "ARCHLAB_MALLOC=system"
    tuned = [k for k in USER_SETTINGS if k in os.environ]
    if tuned:
        return f"{tuned[0]} is set"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc tunables"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "another allocator is preloaded"
    return None


def keep_freed_memory() -> bool:
    """Apply the setting once per process; True when it is in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if _reason_to_skip() is not None:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        gnu = libc.gnu_get_libc_version  # glibc only (musl has no mallopt tunables)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    gnu.restype = ctypes.c_char_p
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
    return _applied
