"""``pytest -m gpu`` where torch sees no CUDA device fails with a message (conftest.py) instead of passing
on 22 skipped tests; without ``-m gpu`` the GPU tests are skipped, as in CPU-only CI. CUDA is hidden from
the child pytest (``CUDA_VISIBLE_DEVICES=""``), so this holds on a GPU machine too."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import _asks_for_gpu_tests

REPO = Path(__file__).resolve().parents[1]


def _pytest(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_gpu_run_without_cuda_fails_with_a_message() -> None:
    proc = _pytest("-m", "gpu", "tests/train/test_gpu.py")
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, out
    assert "asks for the GPU tests" in proc.stderr and "finds no CUDA device" in proc.stderr, out
    assert not re.search(r"\d+ (passed|skipped)", out), out  # stopped before running anything


def test_gpu_tests_skip_in_a_run_that_does_not_ask_for_them() -> None:
    proc = _pytest("-rs", "tests/train/test_gpu.py", "-k", "cuda_steps_match_cpu and relu_dn")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # relu_dn's CUDA step, once per kernel (sparse, dense): both skipped, nothing run
    assert "2 skipped" in out and "needs a CUDA device" in out and "passed" not in out, out


@pytest.mark.parametrize(("markexpr", "asks"), [
    ("gpu", True), ("gpu and not slow", True), ("gpu or slow", True),
    ("not slow", False), ("slow", False), ("not gpu", False),
])
def test_which_marker_expressions_ask_for_the_gpu_tests(markexpr: str, asks: bool) -> None:
    assert _asks_for_gpu_tests(markexpr) is asks
