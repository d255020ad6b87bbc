"""The header every results file starts with: what ran, where, and how fast this machine was that day.

The CPU's speed varies about 2x between sessions here, so a figure is only comparable with the GEMM rate
measured in the same run; the header carries it.
"""

from __future__ import annotations

import datetime
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def gemm_gflops(n: int = 2048, reps: int = 5) -> float:
    """Median fp32 GEMM rate ``[n, n] @ [n, n]`` in GFLOP/s, with this process's thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[reps // 2] / 1e9


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def header(command: str) -> str:
    """``# key: value`` lines: command, commit (``+dirty`` with uncommitted changes), UTC date, versions,
    threads, measured GEMM rate."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "sae_lightning", "benchmarks", "conf", "train.py")
    commit = git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    lines = {"command": command, "commit": commit,
             "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
             "versions": f"torch {torch.__version__}, transformers {_version('transformers')}, "
                         f"lightning {_version('lightning')}, sae-lens {_version('sae-lens')}",
             "threads": str(torch.get_num_threads()),
             "fp32 GEMM": f"{gemm_gflops():.0f} GFLOP/s (2048^3, median of 5)"}
    return "".join(f"# {k}: {v}\n" for k, v in lines.items())
