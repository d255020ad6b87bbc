"""io.py: atomic writes, never overwriting an earlier output, chunked file hashes; the Python we support."""

from __future__ import annotations

import hashlib
import re
import sys
import tomllib
from pathlib import Path

import pytest

from sae_lightning.io import atomic_write, atomic_write_json, keep_previous, sha256_file

REPO = Path(__file__).resolve().parents[1]


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"a": 1})

    def half_then_fail(f) -> None:
        f.write(b'{"a": ')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == '{\n  "a": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind


def test_keep_previous_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    assert keep_previous(path) is None
    for text in ("first", "second", "third"):
        keep_previous(path)
        path.write_text(text)
    kept = sorted(p.read_text() for p in tmp_path.glob("metrics.*.json"))
    assert kept == ["first", "second"] and path.read_text() == "third"


def test_sha256_file_reads_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = bytes(range(256)) * (3 * (1 << 22) // 256 + 7)  # three chunks and a bit
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_the_python_we_promise_is_the_one_we_run() -> None:
    """pyproject, README and Makefile name one minimum Python, and the tests run on it or newer."""
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    major, minor = map(int, re.fullmatch(r">=(\d+)\.(\d+)", spec).groups())
    for doc in ("README.md", "Makefile"):
        assert f"Python {major}.{minor}+" in (REPO / doc).read_text(), doc
    assert sys.version_info >= (major, minor)
