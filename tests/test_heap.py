"""heap.release gives freed heap pages back to the OS (glibc), and leaves other devices alone."""

from __future__ import annotations

import json
import subprocess
import sys

from sae_lightning import heap

# Run in a fresh interpreter: glibc's mmap threshold depends on what the process freed before.
SCENARIO = """
import json, torch
from sae_lightning import heap

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

big = torch.ones(30 * 2**18)
del big  # a freed 30 MiB block raises glibc's mmap threshold: the 4 MiB blocks below come from the heap
temps, keepers = [], []
for _ in range(48):  # 4 MiB temporaries, each followed by a small block that outlives it
    temps.append(torch.ones(2**20))
    keepers.append(torch.ones(16))
held = rss()
del temps  # 192 MiB free in fragments between the keepers
freed = rss()
released = heap.release("cpu")
print(json.dumps({"held": held, "freed": freed, "after": rss(), "released": released}))
"""


def test_release_returns_fragmented_free_heap_pages() -> None:
    assert heap._TRIM is not None, "this C library has no malloc_trim (CI and the docs' platform: glibc)"
    out = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["held"] - r["freed"] < 20, r   # without release, the freed fragments stay resident
    assert r["released"] is True
    assert r["freed"] - r["after"] > 150, r  # release hands them back


def test_release_leaves_other_devices_alone() -> None:
    assert heap.release("meta") is False
