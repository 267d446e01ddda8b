"""The run lock: at most one process writes a run at a time.

A writer holds an exclusive ``flock`` on ``runs/<name>/lock`` and writes its pid, host and
start time into the file. The kernel drops a ``flock`` when its holder dies, even by SIGKILL,
so a killed run never blocks its own resume: the file still names the dead holder, which tells
the next writer (and ``Run.status``) that the run was interrupted rather than finished
cleanly. A clean release empties the file.

>>> lock = RunLock(Path("runs/r/lock"))          # doctest: +SKIP
>>> lock.acquire()                               # doctest: +SKIP
None                                             # (or the stale holder it took over)
>>> lock.release()                               # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any


class RunLockedError(RuntimeError):
    """Another live process is writing the run."""


def _describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')} "
            f"(since {holder.get('since')})")


class RunLock:
    """Exclusive lock on one run folder; see the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> dict[str, Any] | None:
        """Take the lock. Returns the previous holder if it died without releasing it (a
        stale lock taken over), else None; ``RunLockedError`` names a live holder."""
        if self._fd is not None:
            return None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock(fd, self.path)
        except BaseException:
            os.close(fd)
            raise
        stale = _read(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return stale

    def release(self) -> None:
        """Empty the file (a clean stop) and drop the lock; idempotent."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # a full or read-only disk: the holder info stays, the lock still goes
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock now (another process, or this object), or None if nobody."""
        if self._fd is not None or not self.path.is_file():
            return _read(self._fd) if self._fd is not None else None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read(fd) or {"pid": "?", "host": "?", "since": "?"}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


def _flock(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd)
        who = _describe(holder) if holder else "another process"
        raise RunLockedError(
            f"run {path.parent.name!r} is being written by {who}; wait for it to finish, "
            f"or stop that process and resume the run (its lock is {path})"
        ) from None
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise RunLockedError(
                f"cannot lock {path}: the filesystem does not support file locks ({err}); "
                "put the runs folder (--root) on a local disk"
            ) from err
        raise


def _read(fd: int) -> dict[str, Any] | None:
    raw = os.pread(fd, 4096, 0)
    if not raw.strip():
        return None
    try:
        holder = json.loads(raw)
    except ValueError:
        return {"pid": "?", "host": "?", "since": "?"}  # torn write by a killed holder
    return holder if isinstance(holder, dict) else None
