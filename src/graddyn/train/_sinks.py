"""Copies of a run's metrics for the tools researchers look at curves with: TensorBoard event
files, an MLflow tracking store, a CSV file. The run's SQLite database stays the source of
truth: a sink only mirrors what ``Run.log`` has already committed, a sink that fails is
dropped with a warning (the run goes on), and ``graddyn export`` (``export_run``) rewrites
any of them from the database of a finished or interrupted run.

    run.log_to("tensorboard", "mlflow")     # graddyn run NAME --log tensorboard,mlflow

Where they go: TensorBoard to ``<run>/tensorboard/`` (``tensorboard --logdir runs``); MLflow to
one file store per run root, ``<root>/mlruns`` (``mlflow ui --backend-store-uri runs/mlruns``;
``$MLFLOW_TRACKING_URI`` picks another backend), one MLflow run per graddyn run, with the config
as parameters; CSV to ``<run>/metrics.csv`` (one row per step, one column per metric).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from graddyn.train._store import Run

SINKS = ("tensorboard", "mlflow", "csv")
LIVE = ("tensorboard", "mlflow")  # what can follow a run as it logs (csv: export only)
_PACKAGE = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


class Sink(Protocol):
    """Receives every ``Run.log`` call after it is committed."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self, status: str | None = None) -> None: ...


def check_sinks(names: Sequence[str], valid: Sequence[str] = LIVE) -> list[str]:
    """The sink names, checked: ``ValueError`` naming the valid ones, ``ImportError`` naming
    the package to install (before a run is created, so a typo costs nothing)."""
    out = []
    for name in names:
        name = name.strip().lower()
        if name not in valid:
            from graddyn._registry import suggest

            raise ValueError(f"unknown log target {name!r}{suggest(name, valid)}; valid: "
                             + ", ".join(valid))
        if name in _PACKAGE:
            _need(_PACKAGE[name], name)
        out.append(name)
    return out


def _need(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(f"logging to {extra} needs the {module!r} package: pip install "
                          f"'graddyn[{extra}]'")


class TensorBoardSink:
    """Scalars into TensorBoard event files under ``log_dir`` (``torch.utils.tensorboard``)."""

    def __init__(self, log_dir: Path, config: Mapping[str, Any] | None = None) -> None:
        _need("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir))
        if config:
            self.writer.add_text("config", "```\n" + json.dumps(dict(config), indent=1)
                                 + "\n```", 0)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, float(value), int(step))

    def close(self, status: str | None = None) -> None:
        self.writer.flush()
        self.writer.close()


def mlflow_uri(root: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the file store ``<root>/mlruns``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri or Path(root, "mlruns").resolve().as_uri()


class MLflowSink:
    """One MLflow run (named after the graddyn run, config as parameters) in the tracking
    store ``uri``. ``run_id`` reopens an existing MLflow run (a resumed graddyn run)."""

    def __init__(self, uri: str, experiment: str, run_name: str,
                 config: Mapping[str, Any] | None = None, run_id: str | None = None) -> None:
        _need("mlflow", "mlflow")
        # MLflow 3 keeps the file store in maintenance mode behind this opt-in; a local
        # folder of plain files is what a run store next to SQLite wants
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            exp_id = (found.experiment_id if found is not None
                      else self.client.create_experiment(experiment))
            run = self.client.create_run(exp_id, run_name=run_name)
            run_id = run.info.run_id
            params = [Param(k, json.dumps(v) if not isinstance(v, str) else v)
                      for k, v in sorted((config or {}).items())]
            self.client.log_batch(run_id, params=[Param(p.key, p.value[:500]) for p in params])
        self.run_id = run_id

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def close(self, status: str | None = None) -> None:
        state = {"finished": "FINISHED", "failed": "FAILED"}.get(status or "", "KILLED")
        if status is not None and status != "running":
            self.client.set_terminated(self.run_id, state)


def open_sink(name: str, run: Run) -> Sink:
    """The sink ``name`` (one of ``SINKS``) for ``run``, in its default place."""
    config = run.config
    if name == "tensorboard":
        return TensorBoardSink(run.dir / "tensorboard", config)
    if name == "mlflow":
        sink = MLflowSink(mlflow_uri(run.dir.parent), run.experiment or "graddyn", run.name,
                          config, run.get_meta("mlflow_run_id"))
        if run.get_meta("mlflow_run_id") != sink.run_id and not run.readonly:
            run.set_meta(mlflow_run_id=sink.run_id)
        return sink
    raise ValueError(f"{name!r} cannot follow a live run; valid: {', '.join(LIVE)}")


def export_run(run: Run, to: str, out: Path | str | None = None) -> Path | str:
    """Write every metric of ``run`` (from its database) to ``to`` (one of ``SINKS``); returns
    the folder / file / tracking URI written. ``out``: another place (a folder for
    tensorboard, a file for csv, a folder or tracking URI for mlflow). TensorBoard and CSV
    copies are rewritten whole; an MLflow export creates a new MLflow run."""
    (to,) = check_sinks([to], SINKS)
    names = run.metric_names()
    rows: dict[int, dict[str, float]] = {}
    for name in names:
        steps, values = run.history(name)
        for s, v in zip(steps.tolist(), values.tolist()):
            rows.setdefault(s, {})[name] = v
    if to == "csv":
        path = Path(out) if out is not None else run.dir / "metrics.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", *names])
            for s in sorted(rows):
                w.writerow([s, *[_cell(rows[s].get(n)) for n in names]])
        return path
    if to == "tensorboard":
        folder = Path(out) if out is not None else run.dir / "tensorboard"
        if folder.is_dir():  # rewritten whole: a resumed run's live copy may repeat steps
            shutil.rmtree(folder)
        sink: Sink = TensorBoardSink(folder, run.config)
        where: Path | str = folder
    else:
        where = (str(out) if out is not None and ":" in str(out)
                 else Path(out).resolve().as_uri() if out is not None
                 else mlflow_uri(run.dir.parent))
        sink = MLflowSink(where, run.experiment or "graddyn", run.name, run.config)
    for s in sorted(rows):
        sink.log(s, rows[s])
    sink.close(run.status)
    return where


def _cell(v: float | None) -> str:
    return "" if v is None else repr(float(v))
