"""heap.release gives freed heap pages back to the OS (glibc) once they pass its slack, and leaves other
devices alone."""

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
    return heap.resident_bytes() / 2**20

def fragments(mib):
    # 4 MiB temporaries, each followed by a 256 KiB block that outlives it (too big for the small-block
    # free lists, so it is cut from the top of the heap, between the temporaries)
    temps, keepers = [], []
    for _ in range(mib // 4):
        temps.append(torch.ones(2**20))
        keepers.append(torch.ones(2**16))
    held = rss()
    del temps  # freed, in fragments between the keepers
    return held, rss(), keepers

big = torch.ones(30 * 2**18)
del big  # a freed 30 MiB block raises glibc's mmap threshold: the 4 MiB blocks below come from the heap
first = heap.release("cpu")  # the first reading settles, nothing is trimmed
held, freed, k1 = fragments(192)  # past the slack
released = heap.release("cpu")
after = rss()
heap.release("cpu")  # settles again
_, small_freed, k2 = fragments(heap.SLACK // 2**20 // 2)  # within the slack
small_released = heap.release("cpu")
print(json.dumps({"first": first, "held": held, "freed": freed, "released": released, "after": after,
                  "small_freed": small_freed, "small_released": small_released, "small_after": rss()}))
"""


def test_release_returns_fragmented_free_heap_pages_past_the_slack() -> None:
    assert heap._TRIM.trim is not None, "this C library has no malloc_trim (CI and the docs' platform: glibc)"
    out = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["first"] is False, r
    assert r["held"] - r["freed"] < 20, r   # without release, the freed fragments stay resident
    assert r["released"] is True, r
    assert r["freed"] - r["after"] > 150, r  # release hands them back
    assert r["small_released"] is False, r  # growth within the slack is left for reuse
    assert abs(r["small_after"] - r["small_freed"]) < 5, r


def test_release_leaves_other_devices_alone() -> None:
    assert heap.release("meta") is False
