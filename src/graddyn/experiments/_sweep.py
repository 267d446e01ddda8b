"""Sweeps: a grid of configs of one experiment, run in parallel worker processes or as Ray
tasks (``backend="ray"``, ``_sweep_ray.py``).

``--grid noise=0,0.25,0.5 c=0,1`` is the 6-point product. Each point becomes a run named
deterministically from its config, so re-running a sweep skips finished runs and resumes
interrupted ones. A point whose worker dies (SIGKILL, out of memory, a lost Ray node) is
retried up to ``retries`` times, resuming from its last checkpoint, while the others go on.
The sweep folder ``runs/<sweep>/sweep.json`` lists the grid, the runs, each run's status, each
failure's error and each retry's cause (``retried``); a run records its lost workers in its
meta (``lost_workers``, shown by ``graddyn show``).
For tuple-valued fields, separate grid values with ``;`` (``widths=8,8;16,16``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import shlex
import signal
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Protocol, get_origin

from graddyn.distributed._launch import _mp_context
from graddyn.experiments._config import (
    ConfigError,
    check_key,
    default_run_name,
    parse_overrides,
    split_override,
)
from graddyn.experiments._runner import (
    SWEEP_MANIFEST,
    get_experiment,
    interrupt_on_sigterm,
    run_experiment,
)
from graddyn.train import RunNotFoundError, RunStore
from graddyn.train._lock import RunLockedError
from graddyn.train._store import check_run_name, git_sha


@dataclass
class SweepResult:
    """What a sweep did: every run name, which were already finished, which failed (why),
    which were retried after their worker died (why, once per retry)."""

    name: str
    dir: Path
    runs: list[str]
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    retried: dict[str, list[str]] = field(default_factory=dict)


BACKENDS = ("local", "ray")


def parse_grid(config_cls: type, grid: Sequence[str]) -> dict[str, list[str]]:
    """``["key=v1,v2", ...]`` -> {key: [v1, v2]}, keys checked against the config."""
    axes: dict[str, list[str]] = {}
    for item in grid:
        key, text = split_override(item)
        tp = check_key(config_cls, key)
        sep = ";" if get_origin(tp) in (tuple, list) else ","
        values = [v.strip() for v in text.split(sep)]
        if not text or any(v == "" for v in values):
            raise ConfigError(f"empty value in grid {item!r}; expected {key}=v1{sep}v2{sep}...")
        axes[key] = values
    if not axes:
        raise ConfigError("a sweep needs at least one --grid key=v1,v2,...")
    return axes


def expand_grid(axes: dict[str, list[str]], base: Sequence[str] = ()) -> list[list[str]]:
    """Override lists of every grid point (``base`` first, then the point's values)."""
    keys = list(axes)
    return [
        [*base, *(f"{k}={v}" for k, v in zip(keys, combo))]
        for combo in itertools.product(*(axes[k] for k in keys))
    ]


def sweep_name(experiment: str, axes: dict[str, list[str]], base: Sequence[str]) -> str:
    """Deterministic: experiment, grid keys and a hash of the full grid spec."""
    spec = json.dumps([experiment, axes, list(base)], sort_keys=True)
    digest = hashlib.sha1(spec.encode()).hexdigest()[:8]
    return f"{experiment}__sweep__{'-'.join(axes)}_{digest}"


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a sweep; the message gives the command that resumes it."""


def sweep_command(experiment: str, grid: Sequence[str], base: Sequence[str], root: str | Path,
                  workers: int, name: str, backend: str = "local",
                  address: str | None = None) -> str:
    """The ``graddyn sweep`` command that (re)runs this sweep: finished points are skipped,
    interrupted ones resume."""
    parts = ["graddyn", "sweep", experiment, "--grid", *grid]
    parts += ["--set", *base] if base else []
    parts += ["--workers", str(workers), "--name", name]
    parts += ["--root", str(root)] if Path(root) != Path("runs") else []
    parts += ["--backend", backend] if backend != "local" else []
    parts += ["--address", address] if address else []
    return shlex.join(parts)


def _run_point(experiment: str, overrides: list[str], root: str, run_name: str,
               log: Sequence[str] = ()) -> str | None:
    """Run (or resume) one grid point; returns the error text or None."""
    try:
        run_experiment(experiment, overrides, root=root, run_name=run_name,
                       resume="if-exists", progress=False, log=log)
    except Exception as err:  # recorded in the run and the manifest; others go on
        return f"{type(err).__name__}: {err}"
    return None


def _point_process(experiment: str, overrides: list[str], root: str, run_name: str,
                   log: Sequence[str], conn: Any) -> None:
    """Body of one point's worker process: its result goes back through ``conn``."""
    import torch

    torch.set_num_threads(1)  # workers share the machine's cores
    interrupt_on_sigterm()  # the run is marked interrupted, then the worker exits
    try:
        conn.send(_run_point(experiment, overrides, root, run_name, log))
    except KeyboardInterrupt as err:
        conn.send(f"interrupted: {err}")
    finally:
        conn.close()


def _write_manifest(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def run_sweep(
    experiment: str,
    grid: Sequence[str],
    base: Sequence[str] = (),
    *,
    root: str | Path = "runs",
    workers: int = 1,
    name: str | None = None,
    backend: str = "local",
    address: str | None = None,
    retries: int = 1,
    log: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run every grid point of ``experiment``: ``backend="local"``, ``workers`` processes
    (1 = in this process); ``"ray"``, ``workers`` Ray tasks at a time on the cluster at
    ``address`` (default: a local one started for the sweep and stopped after it).

    All points are validated before anything starts. Finished runs are skipped; a failing
    point is recorded (in its run and the manifest's ``status`` / ``errors``, rewritten as
    each point ends) without stopping the others. A point whose worker dies is retried up to
    ``retries`` times from its last checkpoint (``retried`` in the manifest and the result),
    then recorded like a failure, its run ``interrupted``. Ctrl-C raises ``SweepInterrupted``
    with the command that resumes the sweep. ``log``: also copy each run's metrics
    (``Run.log_to``); ``progress(line)``: called with one line as each point ends (its status
    and time), e.g. ``print``."""
    exp = get_experiment(experiment)
    axes = parse_grid(exp.Config, grid)
    both = sorted(set(axes) & {split_override(b)[0] for b in base})
    if both:
        raise ConfigError(f"{', '.join(both)} given both as a --grid axis and with --set; the "
                          "grid would override --set: drop one of them")
    points = expand_grid(axes, base)
    names = [default_run_name(experiment, parse_overrides(exp.Config, p)) for p in points]
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if backend not in BACKENDS or retries < 0 or (address and backend != "ray"):
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (got {backend!r}), "
                         f"retries >= 0 (got {retries}), and an address is for backend "
                         f"'ray' (got {address!r})")
    sname = check_run_name(name or sweep_name(experiment, axes, base))
    sdir = Path(root) / sname
    sdir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "experiment": experiment, "grid": axes, "base": list(base), "runs": names,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(), "backend": backend, "status": {}, "errors": {}, "retried": {},
    }
    store = RunStore(root)
    result = SweepResult(sname, sdir, names)

    def status(run_name: str) -> str:
        if not store.exists(run_name):
            return "missing"
        with store.open(run_name) as run:
            return run.status

    def record() -> None:
        manifest["status"] = {rn: status(rn) for rn in names}
        manifest["errors"] = dict(result.failed)
        manifest["retried"] = {rn: list(why) for rn, why in result.retried.items()}
        _write_manifest(sdir / SWEEP_MANIFEST, manifest)

    record()
    todo = []
    for pt, rn in zip(points, names):
        if status(rn) == "finished":
            result.skipped.append(rn)
        else:
            todo.append((pt, rn))

    started = time.monotonic()
    if progress is not None:
        progress(f"sweep {sname}: {len(points)} points, {len(result.skipped)} already finished, "
                 f"{len(todo)} to run with {min(workers, max(len(todo), 1))} worker(s)")

    def done(run_name: str, error: str | None) -> None:
        if error is not None:
            result.failed[run_name] = error
        record()
        if progress is not None:
            ended = len(result.failed) + sum(s == "finished" for s in manifest["status"].values())
            state = "failed: " + error.splitlines()[0] if error else manifest["status"][run_name]
            progress(f"[{min(ended, len(points))}/{len(points)}] {run_name}: {state} "
                     f"({time.monotonic() - started:.0f} s into the sweep)")

    def retry(run_name: str, why: str) -> None:
        result.retried.setdefault(run_name, []).append(why)
        record()

    try:
        if backend == "ray":
            from graddyn.experiments._sweep_ray import RayTasks

            with RayTasks(experiment, str(Path(root).resolve()), address, workers,
                          log) as pool:
                drive(pool, todo, workers, retries, done, retry)
        elif workers == 1 or len(todo) <= 1:
            for pt, rn in todo:
                done(rn, _run_point(experiment, pt, str(root), rn, log))
        else:
            drive(Processes(experiment, str(root), log), todo, workers, retries, done, retry)
    except KeyboardInterrupt:
        record()
        cmd = sweep_command(experiment, grid, base, root, workers, sname, backend, address)
        raise SweepInterrupted(f"sweep {sname} interrupted; finished runs are kept; resume "
                               f"the rest with: {cmd}") from None
    return result


Outcome = tuple[Hashable, "str | None", bool]
"""(handle, the point's error text or None, whether its worker died before reporting)."""


class Pool(Protocol):
    """Where points run: ``submit`` starts one, ``wait`` blocks until at least one of
    ``handles`` ended, ``stop`` ends them all (Ctrl-C) and says how each ended."""

    def submit(self, point: list[str], run_name: str) -> Hashable: ...

    def wait(self, handles: list[Hashable]) -> list[Outcome]: ...

    def stop(self, handles: list[Hashable]) -> list[Outcome]: ...


def drive(pool: Pool, todo: list[tuple[list[str], str]], workers: int, retries: int,
          done: Callable[[str, str | None], None], retry: Callable[[str, str], None]) -> None:
    """At most ``workers`` points at a time; a point whose worker died is queued again (up to
    ``retries`` times): its run resumes from its last checkpoint."""
    pending = deque(todo)
    lost: Counter[str] = Counter()
    active: dict[Hashable, tuple[list[str], str]] = {}
    try:
        while pending or active:
            while pending and len(active) < workers:
                pt, rn = pending.popleft()
                active[pool.submit(pt, rn)] = (pt, rn)
            for handle, error, died in pool.wait(list(active)):
                pt, rn = active.pop(handle)
                if died and lost[rn] < retries:
                    lost[rn] += 1
                    retry(rn, f"{error}; resumed from its last checkpoint")
                    pending.append((pt, rn))
                else:
                    done(rn, f"{error}; re-run the sweep to resume it" if died else error)
    except KeyboardInterrupt:
        for handle, error, _ in pool.stop(list(active)):
            done(active[handle][1], error)
        raise


class Processes:
    """One fresh worker process per point, so a worker that is killed (SIGKILL, out of
    memory) takes only its own point down."""

    def __init__(self, experiment: str, root: str, log: Sequence[str] = ()) -> None:
        from graddyn.experiments import index

        self.experiment, self.root, self.log = experiment, root, list(log)
        # workers fork from a server that has torch and this experiment's module imported
        module = index().get(experiment, ("",))[0]
        self.ctx = _mp_context(("graddyn.experiments",
                                *([f"graddyn.experiments.{module}"] if module else [])))
        self.procs: dict[Any, tuple[str, Any, Any]] = {}  # sentinel -> (run name, process, pipe)

    def submit(self, point: list[str], run_name: str) -> Hashable:
        recv, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_point_process, name=f"graddyn-sweep-{run_name}",
                                args=(self.experiment, point, self.root, run_name, self.log,
                                      send))
        proc.start()
        send.close()
        self.procs[proc.sentinel] = (run_name, proc, recv)
        return proc.sentinel

    def wait(self, handles: list[Hashable]) -> list[Outcome]:
        return [(s, *_outcome(*self.procs.pop(s), self.root)) for s in wait(handles)]

    def stop(self, handles: list[Hashable]) -> list[Outcome]:
        for s in handles:
            self.procs[s][1].terminate()  # SIGTERM: the worker marks its run interrupted
        for s in handles:
            proc = self.procs[s][1]
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
        return [(s, *_outcome(*self.procs.pop(s), self.root)) for s in handles]


def _outcome(run_name: str, proc: Any, recv: Any, root: str) -> tuple[str | None, bool]:
    """(the point's error text, whether its worker died before reporting)."""
    proc.join()
    try:
        if recv.poll():
            return recv.recv(), False
    except EOFError:  # the pipe reads as ready when the worker died: nothing was sent
        pass
    code = proc.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
    return lost_worker(run_name, f"worker process {proc.pid} {how} before it reported",
                       root), True


def lost_worker(run_name: str, reason: str, root: str) -> str:
    """A point's worker died (``reason``): its run, if it was created, is marked
    ``interrupted`` and the death added to its ``lost_workers``; returns ``reason``."""
    store = RunStore(root)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its stale lock is this very worker's
            run = store.open(run_name, lock=True)
    except (RunNotFoundError, RunLockedError):  # died before creating it / resumed elsewhere
        return reason
    with run:
        if run.status not in ("finished", "failed"):
            run.interrupt(reason)
            run.set_meta(lost_workers=[*(run.get_meta("lost_workers") or []), reason])
    return reason
