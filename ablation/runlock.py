"""One run per output directory: an exclusive lock on `<output-dir>/.lock`, held for the whole run.

The lock is an advisory `flock` on an open file: the kernel drops it when the holder exits, however it
exits (kill -9 included), so a stale `.lock` file never blocks a later run. The file itself stays (deleting
it while another process waits on it would let two runs hold two different files); it records who holds it
(pid, host, start time) so that the second run can name the holder.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import weakref
from pathlib import Path

from ablation.config import ConfigError

LOCK_NAME = ".lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are then not protected against each other
    fcntl = None

#: live locks of this process, by resolved output directory (weak: a lock dies with the `train` call holding it)
_HELD: weakref.WeakValueDictionary[Path, RunLock] = weakref.WeakValueDictionary()


class RunLockedError(ConfigError):
    """Another run holds the output directory."""


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another run"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('started', '?')}"


def _locked_error(out: Path) -> RunLockedError:
    return RunLockedError(f"output directory {str(out)!r} is in use by another run ({_holder_text(out / LOCK_NAME)}); "
                          f"wait for it to finish or choose another --output-dir")


def check_unlocked(out: Path) -> None:
    """Raise RunLockedError if a live run holds `out` (writes nothing; for planning)."""
    path = Path(out) / LOCK_NAME
    if fcntl is None or not path.is_file() or Path(out).resolve() in _HELD:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _locked_error(Path(out)) from None
    finally:
        os.close(fd)  # closing also drops the probe's lock


class RunLock:
    """An acquired lock on an output directory; `release()` (or garbage collection, or exit) frees it."""

    def __init__(self, out: Path, fd: int | None):
        self.out = out
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        if _HELD.get(self.out.resolve()) is self:
            del _HELD[self.out.resolve()]

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


def acquire(out: Path) -> RunLock:
    """Create `out` if needed and lock it for this process, or fail at once naming the holder.

    Raises:
        RunLockedError: another live run holds the directory.
    """
    out = Path(out)
    previous = _HELD.get(out.resolve())
    if previous is not None:  # this process's earlier run (e.g. kept alive by a traceback): it is over
        previous.release()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's record must survive our attempt
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _locked_error(out) from None
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    lock = RunLock(out, fd)
    _HELD[out.resolve()] = lock
    return lock


def release(out: Path) -> bool:
    """Release this process's lock on `out` if it holds one; returns whether it did."""
    lock = _HELD.get(Path(out).resolve())
    if lock is None:
        return False
    lock.release()
    return True
