"""Giving the freed part of the C heap back to the operating system (glibc's ``malloc_trim``).

PyTorch's CPU tensors come from ``malloc``. glibc serves blocks under its mmap threshold (which grows to
32 MiB once such a block is freed) from per-thread heaps, and keeps what they free resident for reuse.
A group steps many SAEs one after another while the live stream's thread runs the LM beside them; their
temporaries of 1-32 MiB (a batch of one hook, a weight's gradient, an Adam temporary, an LM layer's output)
are freed in an order that leaves the heaps in fragments, so the process keeps several working sets
resident where it uses one. ``malloc_trim(0)`` hands every free page of every heap back (the pages stay
mapped and are faulted in again when reused). A fixed, lower mmap threshold would do the same for every
allocation, at the price of a page fault on each (the LM forward about a third slower here), so it is not
used.

Trimming at every call would also give back the pages the next step reuses, and pay their page faults
again each step. So :func:`release` trims only once the process's resident memory has grown more than
:data:`SLACK` bytes past where it settled after the last trim: "settled" is the first reading after a trim,
which holds the working set that a step reuses. In a steady state it does nothing but read
``/proc/self/statm``; when freed fragments pile up (or live data grows) past the slack, it trims. The
excess a process keeps is therefore about one slack, on top of what it uses.

On a C library without ``malloc_trim`` (musl, macOS, Windows) :func:`release` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable

import torch

SLACK = 128 * 2**20
"""Bytes of resident growth since the last trim that :func:`release` lets pass without trimming: a few of
the 1-32 MiB step temporaries, small against the working sets it guards."""


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def resident_bytes() -> int:
    """The process's resident set size, from ``/proc/self/statm`` (0 where there is no such file)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class _Trimmer:
    """``malloc_trim(0)`` once the resident memory has grown more than ``slack`` bytes past the first
    reading after the last trim; safe to call from the training thread and the stream's thread at once."""

    def __init__(self, trim: Callable[[int], int] | None, slack: int) -> None:
        self.trim, self.slack = trim, slack
        self.settled: int | None = None
        self.lock = threading.Lock()

    def __call__(self) -> bool:
        if self.trim is None:
            return False
        with self.lock:
            rss = resident_bytes()
            if self.settled is None:
                self.settled = rss
                return False
            if rss - self.settled <= self.slack:
                return False
            self.trim(0)
            self.settled = None
            return True


_TRIM = _Trimmer(_malloc_trim(), SLACK)


def release(device: torch.device | str = "cpu") -> bool:
    """Return the free pages of the C heap to the OS when ``device`` is the CPU and the resident memory has
    grown past the slack (on an accelerator the tensors are not on this heap); True when it trimmed."""
    if torch.device(device).type != "cpu":
        return False
    return _TRIM()
