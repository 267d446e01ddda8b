"""Running, reporting and showing experiments: the library functions behind the CLI."""

from __future__ import annotations

import html
import json
import os
import shlex
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from graddyn._registry import UnknownNameError
from graddyn.experiments._base import EXPERIMENTS, Experiment
from graddyn.experiments._config import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    default_run_name,
    parse_overrides,
)
from graddyn.train import Run, RunExistsError, RunNotFoundError, RunStore, seed_all, set_progress
from graddyn.train._diskio import is_storage_error
from graddyn.train._report_html import headline_metrics, write_html_report
from graddyn.train._store import check_run_name
from graddyn.train._trainer import progress_enabled

SWEEP_MANIFEST = "sweep.json"
# Under torchrun, how long ranks other than 0 wait for rank 0 to create or reopen the run.
RANK_WAIT_S = float(os.environ.get("GRADDYN_RANK_WAIT_S", "300"))


def get_experiment(name: str) -> Experiment:
    """An instance of the registered experiment ``name``; the error lists valid names and any
    experiment module that failed to import (it may be the one you meant)."""
    from graddyn.experiments import IMPORT_ERRORS

    try:
        return EXPERIMENTS.get(name)()
    except UnknownNameError as err:
        broken = "; ".join(f"{m}: {e}" for m, e in sorted(IMPORT_ERRORS.items()))
        msg = str(err) + (f"; modules that failed to import: {broken}" if broken else "")
        raise UnknownNameError(msg + " (see `graddyn list experiments`)") from None


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run; it is marked ``interrupted`` and the message gives the
    exact command that resumes it."""


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


def interrupt_on_sigterm() -> Any:
    """Make SIGTERM (``kill``, torchrun tearing a job down) take the Ctrl-C path: the run is
    marked interrupted and its lock released before the process exits. Main thread only;
    returns the previous handler."""
    return signal.signal(signal.SIGTERM, _sigterm)


def resume_command(run: Run) -> str:
    """The shell command that continues ``run`` (under ``torchrun`` when this process is one
    of its workers)."""
    parts = ["graddyn", "run", run.experiment or "?", "--name", run.name]
    if run.dir.parent != Path("runs"):
        parts += ["--root", str(run.dir.parent)]
    cmd = shlex.join([*parts, "--resume"])
    if _rank() is None:
        return cmd
    nproc = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE", "1")
    return f"torchrun --nproc-per-node {nproc} -m {cmd}"


def _rank() -> int | None:
    """This process's rank under ``torchrun`` (None outside it)."""
    rank = os.environ.get("RANK")
    return None if rank is None else int(rank)


def _saved_config(run: Run, experiment: str, config: Any, overrides: Sequence[str],
                  explicit: bool) -> Any:
    """The config ``run`` was created with; ``overrides`` (or an explicit ``config``) must
    agree with it, since a resumed run cannot change its config half-way."""
    if run.experiment != experiment:
        raise ConfigError(
            f"run {run.name!r} belongs to experiment {run.experiment!r}, not {experiment!r}; "
            "pick another --name"
        )
    saved = config_from_dict(type(config), run.config)
    wanted = config if explicit else parse_overrides(type(config), overrides, base=saved)
    have = config_to_dict(saved)  # a field added since the run was made reads its default
    diff = sorted(k for k, v in config_to_dict(wanted).items() if have.get(k) != v)
    if diff:
        raise ConfigError(
            f"run {run.name!r} was started with a different config (differs in: "
            f"{', '.join(diff)}); resume it without --set, or start a new run with --name"
        )
    return saved


def run_experiment(
    name: str,
    overrides: Sequence[str] = (),
    *,
    root: str | Path = "runs",
    run_name: str | None = None,
    resume: bool | Literal["if-exists"] = False,
    config: Any = None,
    progress: bool | None = None,
    log: Sequence[str] = (),
) -> Run:
    """Run experiment ``name`` with ``overrides`` (``["key=value", ...]``) as a run in ``root``.

    The run is named ``run_name`` or deterministically from the config
    (``default_run_name``). An existing run is an error unless ``resume``; then a finished
    run is returned as is and an unfinished one continues from its latest checkpoint with its
    saved config. ``resume=True`` on a run that does not exist is an error (nothing to
    resume); ``"if-exists"`` starts it instead (sweeps, the demo). While it runs, this process
    holds the run lock. It ends ``finished``; ``failed`` (with the error) if
    ``Experiment.run`` raises; ``interrupted`` on Ctrl-C / SIGTERM (``RunInterrupted``) or a
    disk that refuses a write. Under ``torchrun`` only rank 0 writes; see ``_follow``.
    ``log``: also copy every metric to ``"tensorboard"`` / ``"mlflow"`` (``Run.log_to``)."""
    from graddyn.train._sinks import check_sinks

    log = check_sinks(log)  # before anything is created: a typo or missing package stops here
    exp = get_experiment(name)
    cfg = config if config is not None else parse_overrides(exp.Config, overrides)
    run_name = check_run_name(run_name or default_run_name(name, cfg))
    store = RunStore(root)
    if _rank():
        return _follow(exp, store, run_name, name, type(cfg))
    if store.exists(run_name):
        if not resume:
            raise RunExistsError(
                f"run {run_name!r} already exists in {store.root}/ (status "
                f"{store.open(run_name).status}); pass --resume to continue it or --name to "
                "start another"
            )
        run = store.open(run_name, lock=True)
        try:
            cfg = _saved_config(run, name, cfg, overrides, config is not None)
            if run.status == "finished":
                run.release_lock()
                return run
            run.mark_running()
            run.log_to(*(log or run.get_meta("log", [])))  # a resume keeps the run's copies
        except BaseException:
            run.release_lock()
            raise
        return _execute(exp, cfg, run, progress, created=False)
    if resume is True:
        have = ", ".join(store.names()[:20]) or "(none)"
        raise RunNotFoundError(
            f"nothing to resume: no run {run_name!r} in {store.root}/ (existing runs: {have}); "
            "drop --resume to start it, or pass the --name / --root it was started with"
        )
    run = store.create(run_name, config_to_dict(cfg), seed=getattr(cfg, "seed", None),
                       experiment=name)
    try:
        run.set_meta(overrides=list(overrides), log=list(log))
        run.log_to(*log)
    except BaseException:
        run.release_lock()
        raise
    return _execute(exp, cfg, run, progress, created=True)


def _follow(exp: Experiment, store: RunStore, run_name: str, experiment: str,
            config_cls: type) -> Run:
    """Ranks other than 0 under ``torchrun``: compute, never write. They wait for rank 0 to
    create (or reopen) the run and take its resolved config from the store, so every rank
    runs the same config even when a resume passes ``--resume`` alone."""
    deadline = time.monotonic() + RANK_WAIT_S
    while not store.exists(run_name):
        if time.monotonic() > deadline:
            raise RunNotFoundError(
                f"rank {_rank()}: run {run_name!r} did not appear in {store.root}/ within "
                f"{RANK_WAIT_S:.0f} s. Rank 0 creates it and the other ranks read its config "
                "from there: give every rank the same --root, on a filesystem they all see"
            )
        time.sleep(0.2)
    run = store.open(run_name, readonly=True)
    if run.experiment != experiment:
        raise ConfigError(f"run {run_name!r} belongs to experiment {run.experiment!r}, not "
                          f"{experiment!r}; pick another --name")
    if run.get_meta("status") == "finished":
        return run
    cfg = config_from_dict(config_cls, run.config)
    seed_all(int(getattr(cfg, "seed", 0) or 0))
    before = progress_enabled()
    set_progress(False)  # one progress bar (rank 0's) is enough
    try:
        exp.run(cfg, run)
    finally:
        set_progress(before)
    return run


def _record(mark: Callable[[str], None], text: str) -> None:
    """Record a run's end status, best effort: the disk that just failed may refuse this
    write too, and then the released lock alone shows the run as ``interrupted``."""
    try:
        mark(text)
    except Exception:
        pass


def _execute(exp: Experiment, cfg: Any, run: Run, progress: bool | None,
             created: bool) -> Run:
    seed_all(int(getattr(cfg, "seed", 0) or 0))
    before = progress_enabled()
    if progress is not None:
        set_progress(progress)
    discard = False
    try:
        exp.run(cfg, run)
        run.finish()
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM through the CLI's handler
        why = f"stopped by {err.args[0]}" if err.args else "stopped by Ctrl-C"
        _record(run.interrupt, why)
        raise RunInterrupted(f"run {run.name} {why}; resume with: {resume_command(run)}"
                             ) from None
    except Exception as err:
        text = f"{type(err).__name__}: {err}"
        storage = is_storage_error(err)
        _record(run.interrupt if storage else run.fail, text)
        err.resume_command = resume_command(run)  # type: ignore[attr-defined]
        # failed while starting (missing data, bad dataset name): keep no folder that would
        # make the same command fail with "already exists"
        discard = created and not storage and _safe(run.recorded_nothing)
        raise
    finally:
        set_progress(before)
        run.release_lock()
        if discard:
            run.close()
            shutil.rmtree(run.dir, ignore_errors=True)
    return run


def _safe(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except Exception:
        return False


def _resolve(target: str, root: str | Path) -> tuple[str, list[Run], Path, str]:
    """(experiment, runs, report folder, title) of a run or sweep named ``target``."""
    store = RunStore(root)
    manifest = store.path(target) / SWEEP_MANIFEST  # the name is checked: no ../ escapes
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        runs = [store.open(n) for n in info["runs"] if store.exists(n)]
        return info["experiment"], runs, manifest.parent / "report", f"sweep {target}"
    if store.exists(target):
        run = store.open(target)
        return run.experiment or "", [run], run.dir / "report", f"run {target}"
    raise RunNotFoundError(
        f"no run or sweep named {target!r} in {Path(root)}/; existing runs: "
        f"{', '.join(store.names()[:20]) or '(none)'}; pass --root if it lives elsewhere"
    )


def report(target: str, *, root: str | Path = "runs", out_dir: Path | None = None) -> Path:
    """Draw the experiment's figures for a run or sweep and write ``report.html`` (figures
    embedded); returns the HTML path."""
    experiment, runs, default_out, title = _resolve(target, root)
    exp = get_experiment(experiment)
    out = Path(out_dir) if out_dir is not None else default_out
    out.mkdir(parents=True, exist_ok=True)
    images = exp.report(runs, out)
    notes = f"<p><b>{html.escape(experiment)}</b>: {html.escape(exp.summary())}</p>"
    return write_html_report(out / "report.html", f"{experiment}: {title}", images, runs, notes)


def _status_line(run: Run) -> str:
    status = run.status
    if status == "running":
        writer = run.writer() or {}
        return f"running  (pid {writer.get('pid')} on {writer.get('host')})"
    if status == "finished":
        return status
    why = run.get_meta("error") or "its process stopped without a clean exit (killed?)"
    return f"{status}  {why}; resume with: {resume_command(run)}"


def show(target: str, *, root: str | Path = "runs") -> str:
    """A text table of a run's latest metrics, after its status, seed, SHA and config; for a
    sweep, one row per point (status, grid values, the main final metrics)."""
    store = RunStore(root)
    if (store.path(target) / SWEEP_MANIFEST).is_file():
        return _show_sweep(target, store)
    run = store.open(target)
    lines = [
        f"run        {run.name}  ({run.dir})",
        f"experiment {run.experiment}",
        f"status     {_status_line(run)}",
        f"seed       {run.seed}   git {run.get_meta('git_sha')}",
        f"created    {run.get_meta('created')}   finished {run.get_meta('finished')}",
        f"config     {json.dumps(run.config)}",
        *(f"lost       {why}" for why in run.get_meta("lost_workers") or ()),  # sweeps
        "",
    ]
    latest = run.latest()
    if not latest:
        return "\n".join([*lines, "(no metrics logged yet)"])
    width = max(len(n) for n in latest)
    lines.append(f"{'metric':<{width}}  {'step':>8}  value")
    lines += [f"{n:<{width}}  {s:>8}  {v:.6g}" for n, (s, v) in latest.items()]
    return "\n".join(lines)


def _show_sweep(target: str, store: RunStore) -> str:
    info = json.loads((store.path(target) / SWEEP_MANIFEST).read_text())
    axes = list(info["grid"])
    runs = [store.open(n) for n in info["runs"] if store.exists(n)]
    latest = [r.latest() for r in runs]
    metrics = headline_metrics(latest)
    header = ["run", "status", *axes, *metrics]
    rows = [[r.name, r.status, *[str(r.config.get(a)) for a in axes],
             *[f"{lat[m][1]:.4g}" for m in metrics]] for r, lat in zip(runs, latest)]
    missing = [n for n in info["runs"] if not store.exists(n)]
    rows += [[n, "not started", *[""] * (len(header) - 2)] for n in missing]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = [f"sweep      {target}  ({store.path(target)})",
             f"experiment {info['experiment']}   grid {json.dumps(info['grid'])}"
             + (f"   --set {' '.join(info.get('base', []))}" if info.get("base") else ""),
             f"created    {info.get('created')}   git {info.get('git_sha')}", ""]
    lines += ["  ".join(f"{c:<{w}}" for c, w in zip(row, widths)).rstrip()
              for row in [header, *rows]]
    for r in runs:
        r.close()
    return "\n".join(lines)
