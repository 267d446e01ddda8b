"""The run store: one folder per run, metrics in SQLite, checkpoints as ``torch.save`` files.

Layout of ``runs/<name>/``::

    run.sqlite        meta (key -> JSON: config, seed, experiment, versions, git_sha, status,
                      created, finished, error) and metrics (name, step, value)
    lock              held (``flock``) by the one process writing the run; see ``_lock``
    checkpoints/      [<tag>/]step_00000100.pt   (written to a temp file, then renamed)
    figures/          PNGs saved with ``Run.save_figure`` (only if any; ``graddyn report``
                      writes its page and figures to ``report/``)
    arrays/           small .npy arrays (heatmaps, Gram matrices)

Every ``log`` is its own committed transaction in WAL mode, so a run killed at any moment
keeps every metric logged before the kill, and a reader (``graddyn show``) never blocks the
writer. A write the disk refuses (full, read-only) raises ``StorageError`` naming the file;
an unreadable checkpoint is skipped for the previous one, with a warning naming it.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import os
import re
import sqlite3
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graddyn.train._diskio import (
    CorruptCheckpointError,
    database_error,
    read_checkpoint,
    write_bytes,
    writing,
)
from graddyn.train._lock import RunLock

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=,+@-]*")  # fullmatch: no trailing newline
_CKPT_RE = re.compile(r"^step_(\d+)\.pt$")
# interrupted: stopped from outside (signal, kill, full or read-only disk); resume continues it
STATUSES = ("running", "interrupted", "finished", "failed")


class InvalidRunNameError(ValueError):
    """A run or sweep name that cannot be a folder name inside the store."""


class CheckpointWarning(UserWarning):
    """A checkpoint could not be read and an older one is used instead."""


class RunExistsError(FileExistsError):
    """A run of that name is already in the store."""


class RunNotFoundError(FileNotFoundError):
    """No run of that name in the store."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Versions of Python and the packages a result depends on (``"missing"`` if absent)."""
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("graddyn", "torch", "numpy", "scipy", "scikit-learn", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


@lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The commit of the graddyn source tree, with ``+dirty`` if it has local changes; None
    outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=5,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def check_run_name(name: str) -> str:
    """Run names become folder names: letters, digits and ``. _ = , + @ -`` only."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidRunNameError(
            f"invalid run name {name!r}: use letters, digits and . _ = , + @ - "
            "(starting with a letter or digit)"
        )
    return name


class Run:
    """Handle on one run folder. Open it through ``RunStore``; see the module docstring.

    ``readonly``: a handle that refuses every write (ranks other than 0 under ``torchrun``
    read the run's config through one). Writers take the run lock (``acquire_lock``)."""

    def __init__(self, dir: Path, readonly: bool = False) -> None:
        self.dir = Path(dir)
        self.name = self.dir.name
        self.readonly = readonly
        self._lock = RunLock(self.dir / "lock")
        self._sinks: list[Any] = []  # TensorBoard / MLflow copies of every log (log_to)
        self.db_path = self.dir / "run.sqlite"
        try:
            self._db = sqlite3.connect(self.db_path, timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a killed process loses nothing
            if not readonly:
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS metrics (name TEXT NOT NULL, "
                    "step INTEGER NOT NULL, value REAL, PRIMARY KEY (name, step))"
                )
        except sqlite3.DatabaseError as err:
            raise database_error(self.db_path, err) from err

    @contextmanager
    def _writing(self, path: Path, cleanup: Path | None = None) -> Iterator[None]:
        """Every write goes through here: refused on a read-only handle; a disk failure
        becomes ``StorageError`` naming ``path``."""
        if self.readonly:
            raise PermissionError(
                f"run {self.name!r} was opened read-only (under torchrun only rank 0 writes "
                "the run); write from rank 0, or open it with RunStore.open(name, lock=True)"
            )
        with writing(path, cleanup):
            yield

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as err:
            raise database_error(self.db_path, err) from err

    # ---- lock -----------------------------------------------------------------------------
    def acquire_lock(self) -> dict[str, Any] | None:
        """Become the run's one writer; returns the holder of a stale lock taken over (a
        process that died while writing), ``RunLockedError`` if a live process holds it."""
        if self.readonly:
            raise PermissionError(f"run {self.name!r} was opened read-only; it cannot be locked")
        return self._lock.acquire()

    def release_lock(self) -> None:
        """Stop writing the run: its sinks are flushed and closed, then the lock released."""
        self.close_sinks()
        self._lock.release()

    def writer(self) -> dict[str, Any] | None:
        """pid / host / since of the process writing the run now (None: nobody)."""
        return self._lock.holder()

    # ---- meta -----------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return default if not rows else json.loads(rows[0][0])

    def set_meta(self, **items: Any) -> None:
        with self._writing(self.db_path), self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in items.items()],
            )

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config as saved when the run was created."""
        return self.get_meta("config", {})

    @property
    def seed(self) -> int | None:
        return self.get_meta("seed")

    @property
    def experiment(self) -> str | None:
        return self.get_meta("experiment")

    @property
    def status(self) -> str:
        """One of ``STATUSES``. A run recorded as ``running`` whose lock nobody holds was
        killed (SIGKILL, power loss): it reads as ``interrupted``."""
        stored = self.get_meta("status", "running")
        if stored == "running" and self.writer() is None:
            return "interrupted"
        return stored

    def mark_running(self) -> None:
        self.set_meta(status="running", error=None)

    def finish(self) -> None:
        self.set_meta(status="finished", finished=_now())

    def fail(self, error: str) -> None:
        self.set_meta(status="failed", finished=_now(), error=error)

    def interrupt(self, reason: str) -> None:
        """Stopped from outside (a signal, a full disk); ``--resume`` continues it."""
        self.set_meta(status="interrupted", finished=None, error=reason)

    # ---- metrics --------------------------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record ``metrics`` at ``step``; committed before returning. Logging a name twice at
        one step keeps the last value (so re-running a resumed step is harmless)."""
        rows = []
        for name, value in metrics.items():
            v = float(value)
            rows.append((name, int(step), None if math.isnan(v) else v))  # SQLite has no NaN
        with self._writing(self.db_path), self._db:
            self._db.executemany("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?)", rows)
        for sink in list(self._sinks):
            self._mirror(sink, lambda s: s.log(step, metrics))

    # ---- copies for other tools (train/_sinks.py) ------------------------------------------
    def log_to(self, *names: str) -> Run:
        """Mirror every later ``log`` to ``"tensorboard"`` and / or ``"mlflow"`` (see
        ``graddyn.train._sinks``); the database stays the source of truth."""
        from graddyn.train._sinks import check_sinks, open_sink

        for name in check_sinks(names):
            self._sinks.append(open_sink(name, self))
        return self

    def _mirror(self, sink: Any, call: Any) -> None:
        """A sink that fails is dropped with a warning: the run goes on (its database has
        everything; ``graddyn export`` rewrites the copy)."""
        try:
            call(sink)
        except Exception as err:
            self._sinks.remove(sink)
            warnings.warn(f"graddyn: run {self.name!r}: stopped copying metrics to "
                          f"{type(sink).__name__} ({type(err).__name__}: {err}); the run "
                          f"goes on; `graddyn export {self.name} --to ...` rewrites the copy",
                          stacklevel=3)

    def close_sinks(self) -> None:
        status = self.get_meta("status") if self._sinks else None
        for sink in list(self._sinks):
            self._mirror(sink, lambda s: s.close(status))
        self._sinks = []

    def history(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one metric sorted by step: int64 (T,), float64 (T,)."""
        rows = self._query("SELECT step, value FROM metrics WHERE name = ? ORDER BY step",
                           (name,))
        steps = np.array([r[0] for r in rows], dtype=np.int64)
        vals = np.array([np.nan if r[1] is None else r[1] for r in rows], dtype=np.float64)
        return steps, vals

    def metric_names(self) -> list[str]:
        return [r[0] for r in self._query("SELECT DISTINCT name FROM metrics ORDER BY name")]

    def latest(self) -> dict[str, tuple[int, float]]:
        """name -> (step, value) of each metric's last record (the table of ``graddyn show``)."""
        rows = self._query(
            "SELECT m.name, m.step, m.value FROM metrics m JOIN (SELECT name, MAX(step) AS s "
            "FROM metrics GROUP BY name) l ON m.name = l.name AND m.step = l.s ORDER BY m.name"
        )
        return {n: (s, np.nan if v is None else v) for n, s, v in rows}

    def truncate_after(self, step: int, prefix: str = "") -> int:
        """Delete metrics logged after ``step`` whose name starts with ``prefix`` (resuming
        from a checkpoint at ``step`` re-creates them). Returns how many rows went."""
        with self._writing(self.db_path), self._db:
            cur = self._db.execute(
                "DELETE FROM metrics WHERE step > ? AND substr(name, 1, ?) = ?",
                (int(step), len(prefix), prefix),
            )
        return cur.rowcount

    def recorded_nothing(self) -> bool:
        """No metric, checkpoint, array or figure yet (a run that failed while starting)."""
        if self._query("SELECT 1 FROM metrics LIMIT 1"):
            return False
        return not any(any(p.is_file() for p in (self.dir / sub).rglob("*"))
                       for sub in ("checkpoints", "arrays", "figures") if (self.dir / sub).is_dir())

    # ---- checkpoints ----------------------------------------------------------------------
    def _ckpt_dir(self, tag: str) -> Path:
        return self.dir / "checkpoints" / tag if tag else self.dir / "checkpoints"

    def save_checkpoint(self, step: int, state: dict[str, Any], tag: str = "") -> Path:
        """``torch.save`` ``state`` as ``checkpoints/[tag/]step_<step>.pt``, atomically: the
        bytes go to a temp file, are synced, then renamed, so a kill or a full disk never
        leaves a truncated checkpoint (nor the temp file). Keep ``state`` to tensors and
        plain containers: it is loaded with ``weights_only=True``."""
        d = self._ckpt_dir(tag)
        path = d / f"step_{int(step):08d}.pt"
        tmp = path.with_suffix(".pt.tmp")
        # serialised in memory first: torch's own file writer reports a full disk as a bare
        # RuntimeError, a plain write gives the OSError (and errno) that names the cause
        buf = io.BytesIO()
        torch.save(state, buf)
        with self._writing(path, cleanup=tmp):
            d.mkdir(parents=True, exist_ok=True)
            write_bytes(tmp, buf.getbuffer())
            os.replace(tmp, path)
        return path

    def checkpoints(self, tag: str = "") -> list[tuple[int, Path]]:
        """``(step, path)`` of every checkpoint under ``tag``, by step."""
        d = self._ckpt_dir(tag)
        if not d.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT_RE.match(p.name))]
        return sorted(found)

    @staticmethod
    def load_checkpoint(path: Path) -> dict[str, Any]:
        """The state saved at ``path`` (``weights_only=True``); ``CorruptCheckpointError``
        naming the file if it cannot be read."""
        return read_checkpoint(path)

    def latest_checkpoint(self, tag: str = "") -> tuple[int, dict[str, Any]] | None:
        """``(step, state)`` of the newest checkpoint that loads, or None if there is none. An
        unreadable one (truncated, empty, not a checkpoint) is skipped with a
        ``CheckpointWarning`` naming it; if none loads, ``CorruptCheckpointError`` lists them."""
        bad = []
        for step, path in reversed(self.checkpoints(tag)):
            try:
                return step, read_checkpoint(path)
            except CorruptCheckpointError as err:
                bad.append(str(err))
                warnings.warn(f"graddyn: {err}; trying the previous checkpoint",
                              CheckpointWarning, stacklevel=2)
        if bad:
            raise CorruptCheckpointError(
                f"run {self.name!r} has no intact checkpoint: " + "; ".join(bad)
                + ". Delete them to start the run over from step 0, or restore them from a copy"
            )
        return None

    # ---- artifacts ------------------------------------------------------------------------
    def save_figure(self, fig: Any, name: str) -> Path:
        """Save a matplotlib figure as ``figures/<name>.png`` and close it."""
        from graddyn.train._report import save_figure

        path = self.dir / "figures" / f"{name}.png"
        with self._writing(path):
            return save_figure(fig, path)

    def _array_path(self, name: str, step: int | None) -> Path:
        safe = name.replace("/", "__")
        suffix = "" if step is None else f".step{int(step):08d}"
        return self.dir / "arrays" / f"{safe}{suffix}.npy"

    def log_array(self, name: str, array: Any, step: int | None = None) -> Path:
        """Save a small array (heatmap, Gram matrix) as ``arrays/<name>[.step<step>].npy``."""
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        path = self._array_path(name, step)
        tmp = path.with_suffix(".tmp.npy")
        with self._writing(path, cleanup=tmp):
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(tmp, np.asarray(array))
            os.replace(tmp, path)
        return path

    def load_array(self, name: str, step: int | None = None) -> np.ndarray:
        return np.load(self._array_path(name, step))

    def close(self) -> None:
        self.release_lock()
        self._db.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r}, status={self.status!r})"


class RunStore:
    """The folder that holds runs (default ``runs/``)."""

    def __init__(self, root: str | os.PathLike[str] = "runs") -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / check_run_name(name)

    def exists(self, name: str) -> bool:
        """A complete run: a folder killed before its config was written is not one (a new
        ``create`` takes it over)."""
        return _is_run(self.path(name))

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _is_run(p))

    def create(
        self,
        name: str,
        config: Mapping[str, Any],
        seed: int | None = None,
        experiment: str | None = None,
        lock: bool = True,
    ) -> Run:
        """A new run recording config, seed, versions and git SHA; status ``running``. The
        returned handle holds the run lock unless ``lock=False``."""
        if self.exists(name):
            raise RunExistsError(
                f"run {name!r} already exists in {self.root}/; resume it (--resume), pick "
                "another name (--name), or delete the folder"
            )
        d = self.path(name)
        with writing(d):
            (d / "checkpoints").mkdir(parents=True, exist_ok=True)
        run = Run(d)
        if lock:
            with writing(d / "lock"):
                run.acquire_lock()
        run.set_meta(
            config=dict(config), seed=seed, experiment=experiment, status="running",
            created=_now(), finished=None, error=None,
            versions=package_versions(), git_sha=git_sha(),
        )
        return run

    def open(self, name: str, lock: bool = False, readonly: bool = False) -> Run:
        """Handle on run ``name``. ``lock=True``: as its one writer (``RunLockedError`` if a
        live process writes it); ``readonly=True``: every write is refused."""
        if not self.exists(name):
            have = self.names()
            listing = ", ".join(have[:20]) + (" ..." if len(have) > 20 else "")
            raise RunNotFoundError(
                f"no run {name!r} in {self.root}/; existing runs: {listing or '(none)'}; "
                "pass --root if it lives elsewhere"
            )
        run = Run(self.path(name), readonly=readonly)
        if lock:
            try:
                with writing(run.dir / "lock"):
                    stale = run.acquire_lock()
            except BaseException:
                run.close()
                raise
            if stale:
                warnings.warn(f"graddyn: run {name!r} was last written by pid {stale.get('pid')} "
                              f"on {stale.get('host')}, which stopped without releasing it; "
                              "taking it over", stacklevel=2)
        return run


def _is_run(d: Path) -> bool:
    """``d`` holds a run whose creation completed (its meta has ``created``); an unreadable
    database counts as a run, so that opening it reports the damage."""
    db = d / "run.sqlite"
    if not db.is_file():
        return False
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        try:
            return bool(con.execute("SELECT 1 FROM meta WHERE key = 'created'").fetchall())
        finally:
            con.close()
    except sqlite3.OperationalError as err:
        return "no such table" not in str(err)
    except sqlite3.DatabaseError:
        return True
