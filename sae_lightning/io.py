"""The one owner of how files are written: whole or not at all, and never over an earlier output.

- :func:`atomic_write` writes beside the target, fsyncs, renames over it and fsyncs the directory, so a
  reader (or a process killed mid-write) sees the old file or the new one, never half of one. On an error
  the temporary file is removed, the old file is untouched, and the ``OSError`` propagates for the caller
  to name what to do.
- :func:`atomic_dir` does the same for a directory built by a callback.
- :func:`keep_previous` renames an earlier output aside instead of overwriting it.
- :func:`sha256_file` hashes a file in chunks (``hashlib.file_digest`` needs Python 3.11; we support 3.10).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

READ_CHUNK = 1 << 22


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then make it ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write` of UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """:func:`atomic_write` of ``obj`` as indented JSON (non-JSON values written with ``str``)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def atomic_dir(target: Path, write: Callable[[Path], Any]) -> None:
    """``write`` a directory beside ``target`` and rename it into place (readers never see half of it).
    If ``target`` appeared meanwhile (another process finished first), ours is discarded."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():
            raise


def keep_previous(path: Path) -> Path | None:
    """Rename an existing ``path`` to ``<stem>.<its mtime><suffix>`` (a counter is added on a clash) so a
    new output never destroys an old one; returns where it went."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    target, n = path.with_name(f"{path.stem}.{stamp}{path.suffix}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}")
    path.rename(target)
    return target


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's content, read in plain chunks (no mmap: it leaves no pages in our RSS)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ_CHUNK):
            digest.update(block)
    return digest.hexdigest()
