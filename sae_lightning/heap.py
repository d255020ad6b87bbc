"""Giving the freed part of the C heap back to the operating system (glibc's ``malloc_trim``).

PyTorch's CPU tensors come from ``malloc``. glibc serves blocks under its mmap threshold (which grows to
32 MiB once such a block is freed) from per-thread heaps, and keeps what they free resident for reuse.
A group steps many SAEs one after another while the live stream's thread runs the LM beside them; their
temporaries of 1-32 MiB (a batch of one hook, a weight's gradient, an Adam temporary, an LM layer's output)
are freed in an order that leaves the heaps in fragments, so the process keeps several working sets
resident where it uses one. :func:`release` hands every free page of every heap back (the pages stay
mapped and are faulted in again when reused). It is called after each group step and after each of the live
stream's LM forwards on the CPU: a few tens of milliseconds against seconds of work. A fixed, lower mmap
threshold would do the same for every allocation, at the price of a page fault on each (the LM forward
about a third slower here), so it is not used.

On a C library without ``malloc_trim`` (musl, macOS, Windows) :func:`release` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import torch


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def release(device: torch.device | str = "cpu") -> bool:
    """Return the free pages of the C heap to the OS when ``device`` is the CPU (on an accelerator the
    tensors are not on this heap); True when pages were released."""
    if _TRIM is None or torch.device(device).type != "cpu":
        return False
    return bool(_TRIM(0))
