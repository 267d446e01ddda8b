"""Sweeps: a grid of configs of one experiment, run in parallel worker processes.

``--grid noise=0,0.25,0.5 c=0,1`` is the 6-point product. Each point becomes a run named
deterministically from its config, so re-running a sweep skips finished runs and resumes
interrupted ones. The sweep folder ``runs/<sweep>/sweep.json`` lists the grid, the runs, each
run's status and each failure's error (a killed worker included).
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, get_origin

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
    """What a sweep did: every run name, which were already finished, which failed (why)."""

    name: str
    dir: Path
    runs: list[str]
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


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
                  workers: int, name: str) -> str:
    """The ``graddyn sweep`` command that (re)runs this sweep: finished points are skipped,
    interrupted ones resume."""
    parts = ["graddyn", "sweep", experiment, "--grid", *grid]
    parts += ["--set", *base] if base else []
    parts += ["--workers", str(workers), "--name", name]
    parts += ["--root", str(root)] if Path(root) != Path("runs") else []
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
    log: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run every grid point of ``experiment`` (``workers`` processes; 1 = in this process).

    All points are validated before anything starts. Finished runs are skipped; a failing
    point, or a worker process that is killed, is recorded (in its run and the manifest's
    ``status`` / ``errors``, rewritten as each point ends) without stopping the others.
    Ctrl-C raises ``SweepInterrupted`` with the command that resumes the sweep. ``log``:
    also copy each run's metrics (``Run.log_to``); ``progress(line)``: called with one line
    as each point ends (its status and time), e.g. ``print``."""
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
    sname = check_run_name(name or sweep_name(experiment, axes, base))
    sdir = Path(root) / sname
    sdir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "experiment": experiment, "grid": axes, "base": list(base), "runs": names,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(), "status": {}, "errors": {},
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

    try:
        if workers == 1 or len(todo) <= 1:
            for pt, rn in todo:
                done(rn, _run_point(experiment, pt, str(root), rn, log))
        else:
            _in_processes(experiment, todo, str(root), workers, done, log)
    except KeyboardInterrupt:
        record()
        cmd = sweep_command(experiment, grid, base, root, workers, sname)
        raise SweepInterrupted(f"sweep {sname} interrupted; finished runs are kept; resume "
                               f"the rest with: {cmd}") from None
    return result


def _in_processes(experiment: str, todo: list[tuple[list[str], str]], root: str, workers: int,
                  done: Callable[[str, str | None], None], log: Sequence[str] = ()) -> None:
    """One fresh worker process per point, at most ``workers`` at a time, so a worker that is
    killed (SIGKILL, out of memory) takes only its own point down: that run is marked
    ``interrupted`` and the others go on."""
    from graddyn.experiments import index

    # workers fork from a server that has torch and this experiment's module imported
    module = index().get(experiment, ("",))[0]
    ctx = _mp_context(("graddyn.experiments",
                       *([f"graddyn.experiments.{module}"] if module else [])))
    pending = list(todo)
    active: dict[Any, tuple[str, Any, Any]] = {}  # sentinel -> (run name, process, pipe)
    try:
        while pending or active:
            while pending and len(active) < workers:
                pt, rn = pending.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_point_process,
                                   args=(experiment, pt, root, rn, list(log), send),
                                   name=f"graddyn-sweep-{rn}")
                proc.start()
                send.close()
                active[proc.sentinel] = (rn, proc, recv)
            for sentinel in wait(list(active)):
                rn, proc, recv = active.pop(sentinel)
                done(rn, _outcome(rn, proc, recv, root))
    except KeyboardInterrupt:
        for _, proc, _ in active.values():
            proc.terminate()  # SIGTERM: each worker marks its run interrupted and exits
        for rn, proc, recv in active.values():
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
            done(rn, _outcome(rn, proc, recv, root))
        raise


def _outcome(run_name: str, proc: Any, recv: Any, root: str) -> str | None:
    """The point's error text; a worker that died without reporting is named, and its run
    (if it was created) marked ``interrupted``."""
    proc.join()
    try:
        if recv.poll():
            return recv.recv()
    except EOFError:  # the pipe reads as ready when the worker died: nothing was sent
        pass
    code = proc.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
    reason = f"worker process {proc.pid} {how} before it reported"
    store = RunStore(root)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its stale lock is this very worker's
            run = store.open(run_name, lock=True)
    except (RunNotFoundError, RunLockedError):  # died before creating it / resumed elsewhere
        return f"{reason}; re-run the sweep to run it"
    with run:
        if run.status not in ("finished", "failed"):
            run.interrupt(reason)
    return f"{reason}; the run is marked interrupted: re-run the sweep to resume it"
