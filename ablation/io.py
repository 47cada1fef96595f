"""Atomic writes: the project's one way to put a file or a directory in place.

Every writer goes through here, so nothing is ever left half-written: content goes to a temporary
name in the destination's own directory (same filesystem), then `os.replace` moves it into place.
A directory that already exists is moved aside first and removed only once the new one is in place,
so a failed final rename leaves the previous version where it was.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def _sibling(path: Path, mark: str) -> Path:
    return path.with_name(f".{path.name}{mark}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (creating parent directories)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, TMP_MARK)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` (e.g. `safetensors.save_file`), then move the file to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, TMP_MARK)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_dir(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, then put tmp_dir at `path`, replacing a previous directory only once it succeeded.

    If the final rename fails the previous directory is moved back, so the last good version survives.
    Leftovers of a killed writer (`.<name>.tmp-*` / `.<name>.old-*` beside `path`) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_orphans(path)
    tmp = _sibling(path, TMP_MARK)
    old = _sibling(path, OLD_MARK)
    try:
        tmp.mkdir()
        write(tmp)
        moved_aside = False
        if path.exists():
            os.replace(path, old)
            moved_aside = True
        try:
            os.replace(tmp, path)
        except OSError:
            if moved_aside:
                os.replace(old, path)  # put the previous version back
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


def clean_orphans(path: str | os.PathLike) -> list[Path]:
    """Remove `.<name>.tmp-*` and `.<name>.old-*` left beside `path` by a killed writer; returns what was removed.

    An `.old-*` directory is restored instead when `path` itself is missing (the writer died between
    moving the old version aside and putting the new one in place).
    """
    path = Path(path)
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    for mark in (OLD_MARK, TMP_MARK):
        for orphan in sorted(path.parent.glob(f".{path.name}{mark}*")):
            if mark == OLD_MARK and not path.exists():
                os.replace(orphan, path)
                continue
            if orphan.is_dir():
                shutil.rmtree(orphan, ignore_errors=True)
            else:
                orphan.unlink(missing_ok=True)
            removed.append(orphan)
    return removed


def json_safe(obj):
    """`obj` as strict JSON values: NaN / inf -> None, tuples -> lists, numpy scalars -> Python, keys -> str."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and type(obj).__module__ == "numpy":  # numpy scalars, without importing numpy here
        return json_safe(obj.item())
    return obj
