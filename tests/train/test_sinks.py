"""TensorBoard and MLflow copies of a run's metrics (live, ``Run.log_to``, and ``export_run``),
read back with the libraries' own readers; the SQLite store stays the source of truth."""

from __future__ import annotations

import csv
import math

import pytest

from graddyn.train import RunStore
from graddyn.train._sinks import check_sinks, export_run

METRICS = {0: {"train/loss": 2.0, "test/acc": 0.1}, 5: {"train/loss": 1.0},
           10: {"train/loss": 0.5, "test/acc": float("nan")}}


def _run(tmp_path, *log):
    run = RunStore(tmp_path).create("r1", {"lr": 0.1, "widths": [8, 8]}, seed=0,
                                    experiment="smoke")
    run.log_to(*log)
    for step, metrics in METRICS.items():
        run.log(step, metrics)
    run.finish()
    run.release_lock()  # closes the sinks, as the end of `graddyn run` does
    return run


def _tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _mlflow(uri, run_id=None):
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "smoke"]
    runs = client.search_runs([exp.experiment_id])
    run = runs[0] if run_id is None else client.get_run(run_id)
    return client, run


def _check_mlflow(client, run):
    assert run.data.tags["mlflow.runName"] == "r1" and run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.1"
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in hist) == [(0, 2.0), (5, 1.0), (10, 0.5)]


def test_live_tensorboard_and_mlflow_copies_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    run = _run(tmp_path, "tensorboard", "mlflow")
    tb = _tensorboard(run.dir / "tensorboard")
    assert tb["train/loss"] == [(0, 2.0), (5, 1.0), (10, 0.5)]
    assert tb["test/acc"][0] == (0, pytest.approx(0.1)) and math.isnan(tb["test/acc"][1][1])
    client, mlrun = _mlflow((tmp_path / "mlruns").as_uri(), run.get_meta("mlflow_run_id"))
    _check_mlflow(client, mlrun)


def test_export_writes_each_target_from_the_database(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    run = _run(tmp_path)
    folder = export_run(run, "tensorboard")
    assert _tensorboard(folder)["train/loss"] == [(0, 2.0), (5, 1.0), (10, 0.5)]
    uri = export_run(run, "mlflow", tmp_path / "elsewhere")
    _check_mlflow(*_mlflow(uri))
    with open(export_run(run, "csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0", "5", "10"]
    assert rows[1]["test/acc"] == "" and float(rows[2]["train/loss"]) == 0.5


def test_a_failing_sink_is_dropped_and_the_run_goes_on(tmp_path):
    run = RunStore(tmp_path).create("r1", {}, experiment="smoke")

    class Broken:
        def log(self, step, metrics):
            raise OSError("disk of the copy is full")

        def close(self, status=None):
            pass

    run._sinks.append(Broken())
    with pytest.warns(UserWarning, match="stopped copying metrics to Broken .*graddyn export"):
        run.log(1, {"x": 1.0})
    run.log(2, {"x": 2.0})  # no second warning: the sink is gone
    assert run.history("x")[1].tolist() == [1.0, 2.0] and not run._sinks
    run.release_lock()


def test_unknown_targets_and_missing_packages_are_named(monkeypatch):
    with pytest.raises(ValueError, match="unknown log target 'tensorbord'; did you mean "
                                         "'tensorboard'"):
        check_sinks(["tensorbord"])
    with pytest.raises(ValueError, match="valid: tensorboard, mlflow$"):
        check_sinks(["csv"])
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install 'graddyn\[mlflow\]'"):
        check_sinks(["mlflow"])


def test_only_live_targets_follow_a_run(tmp_path):
    from graddyn.train._sinks import open_sink

    run = RunStore(tmp_path).create("r1", {}, experiment="smoke")
    with pytest.raises(ValueError, match="'csv' cannot follow a live run"):
        open_sink("csv", run)
    run.release_lock()


def test_a_resumed_run_keeps_copying_where_it_did(tmp_path):
    pytest.importorskip("tensorboard")
    from graddyn.experiments import run_experiment

    run = run_experiment("smoke", ["steps=4", "sleep=0"], root=tmp_path, run_name="r",
                         progress=False, log=["tensorboard"])
    run.set_meta(status="interrupted")
    again = run_experiment("smoke", root=tmp_path, run_name="r", resume=True, progress=False)
    assert again.get_meta("log") == ["tensorboard"]
    assert len(list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents*"))) == 2
