"""Run files on disk: failures that name the file and the fix.

* ``StorageError``: a full disk, a read-only or vanished folder while writing a run. The
  message names the path; the run stays resumable (checkpoints are written to a temp file
  and renamed, metrics are committed one ``log`` at a time).
* ``CorruptCheckpointError`` / ``read_checkpoint``: a checkpoint that cannot be read, with the
  reason in words (torch's own errors name neither the file nor a fix).
"""

from __future__ import annotations

import errno
import os
import pickle
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

# errnos of "the disk cannot take this write now", as opposed to bugs in the caller
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM,
                   errno.EIO, errno.ENOENT}
_SQLITE_STORAGE = ("disk is full", "readonly database", "disk i/o error", "unable to open")


class StorageError(OSError):
    """A run file could not be written (full disk, read-only folder, ...)."""


class RunStoreError(RuntimeError):
    """A run's ``run.sqlite`` is unreadable (not a database, or corrupt)."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be loaded."""


def _fix(err: BaseException) -> str:
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or "full" in str(err):
        return "free space on that disk (or use --root on another one)"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or "readonly" in str(err):
        return "make the folder writable (or use --root on a writable disk)"
    return "check the disk (or use --root elsewhere)"


def storage_error(path: Path, err: BaseException) -> StorageError:
    """``StorageError`` for a failed write of ``path``; keeps ``err``'s errno."""
    code = getattr(err, "errno", None) or (errno.ENOSPC if "full" in str(err) else errno.EIO)
    return StorageError(code, f"cannot write {path}: {err}; {_fix(err)}, then resume the run")


def is_storage_error(err: BaseException) -> bool:
    """A failure of the disk rather than of the caller (see ``_STORAGE_ERRNOS``)."""
    if isinstance(err, StorageError):
        return True
    if isinstance(err, sqlite3.OperationalError):
        return any(s in str(err).lower() for s in _SQLITE_STORAGE)
    return isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS


@contextmanager
def writing(path: Path, cleanup: Path | None = None) -> Iterator[None]:
    """Turn a disk failure inside the block into ``StorageError`` naming ``path``;
    ``cleanup`` (a partial temp file) is removed on any failure, interrupts included."""
    try:
        yield
    except BaseException as err:
        if cleanup is not None:
            try:
                cleanup.unlink(missing_ok=True)
            except OSError:
                pass
        if isinstance(err, StorageError) or not is_storage_error(err):
            raise
        raise storage_error(path, err) from err


def database_error(path: Path, err: sqlite3.DatabaseError) -> RunStoreError:
    return RunStoreError(
        f"{path} is not a readable run database ({err}); move the run folder aside and "
        "start the run again (its checkpoints/ can be kept for reference)"
    )


def _reason(err: BaseException) -> str:
    """Why a checkpoint failed to load, in words. torch's own unpickling error advises
    ``weights_only=False``, which would run whatever code the file holds: not repeated."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text:
        return ("it is not a checkpoint of tensors and plain containers (refused: loading it "
                "as one could run code)")
    if isinstance(err, EOFError):
        return "the file is empty"
    if "zip archive" in text or "central directory" in text:
        return "the file is cut short or not a torch checkpoint"
    first = text.splitlines()[0] if text else "(no message)"
    return f"not a torch checkpoint ({type(err).__name__}: {first})"


def read_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on CPU; ``CorruptCheckpointError`` naming the
    file and the reason if its content cannot be read (an unreadable *disk* raises as is)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, KeyError...
        raise CorruptCheckpointError(f"checkpoint {path} cannot be loaded: {_reason(err)}"
                                     ) from err
    if not isinstance(state, dict):
        raise CorruptCheckpointError(
            f"checkpoint {path} cannot be loaded: it holds a {type(state).__name__}, not the "
            "dict graddyn writes")
    return state


def write_bytes(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` and sync it to disk before returning, so a rename that
    follows never publishes a file whose bytes are still only in the page cache."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
