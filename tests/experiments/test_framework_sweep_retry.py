"""A sweep worker killed mid-run is retried from its last checkpoint: the other points
finish, the manifest and the run say what happened, and nothing recorded is lost (the
resumed run's metrics equal an uninterrupted run's, bit for bit). The Ray backend's twin is
``test_sweep_ray.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graddyn.experiments import default_run_name, parse_overrides, run_experiment, show
from graddyn.experiments._smoke import SmokeConfig
from graddyn.experiments._sweep import drive
from graddyn.train import RunStore

QUIET = {"OMP_NUM_THREADS": "1", "GRADDYN_QUIET": "1"}
BASE = ["steps=30", "checkpoint_every=5", "eval_every=5", "sleep=0.1"]
GRID = ["noise=0,0.25,0.5"]


def holder(lock: Path) -> int | None:
    """pid of the process writing a run (its lock), once it holds it."""
    text = lock.read_text() if lock.is_file() else ""
    return json.loads(text)["pid"] if text.strip() else None


def kill_mid_run(argv: list[str], root: Path, log: Path, timeout: float = 240
                 ) -> tuple[subprocess.CompletedProcess, str, int]:
    """Start the sweep ``argv``, SIGKILL the worker of its first point once that point has a
    checkpoint, and wait for the sweep: (finished sweep, killed run's name, killed pid)."""
    first = default_run_name("smoke", parse_overrides(SmokeConfig, [*BASE, "noise=0"]))
    env = {**os.environ, **QUIET}  # now: e.g. Ray's auth settings of a cluster started here
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=open(log, "w"),  # noqa: SIM115
                            text=True)
    deadline = time.monotonic() + timeout
    ckpt = root / first / "checkpoints" / "step_00000010.pt"
    while not (ckpt.is_file() and holder(root / first / "lock")):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    victim = holder(root / first / "lock")
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(argv, proc.returncode, out, log.read_text()), first, victim


def check_resumed(root: Path, sweep: str, first: str, ref_root: Path, cause: str) -> None:
    """Every point finished; the killed one was retried once, says why, and lost nothing."""
    manifest = json.loads((root / sweep / "sweep.json").read_text())
    assert set(manifest["status"].values()) == {"finished"} and manifest["errors"] == {}
    assert list(manifest["retried"]) == [first]
    [why] = manifest["retried"][first]
    assert cause in why and why.endswith("resumed from its last checkpoint")
    run = RunStore(root).open(first)
    assert run.status == "finished" and len(run.get_meta("lost_workers")) == 1
    assert cause in run.get_meta("lost_workers")[0]
    assert f"lost       {run.get_meta('lost_workers')[0]}" in show(first, root=root)
    ref = run_experiment("smoke", [*BASE, "noise=0"], root=ref_root, progress=False)
    for name in ref.metric_names():
        (s1, v1), (s2, v2) = run.history(name), ref.history(name)
        assert s1.tolist() == s2.tolist() and v1.tobytes() == v2.tobytes(), name


def test_killed_process_pool_worker_resumes_and_the_others_finish(tmp_path):
    root = tmp_path / "runs"
    argv = [sys.executable, "-m", "graddyn", "sweep", "smoke", "--root", str(root), "--grid",
            *GRID, "--set", *BASE, "--workers", "2", "--name", "sk"]
    done, first, victim = kill_mid_run(argv, root, tmp_path / "stderr.txt")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 runs, 0 already finished, 0 failed, 1 retried" in done.stdout
    check_resumed(root, "sk", first, tmp_path / "ref", f"worker process {victim} killed by "
                                                       "SIGKILL")


class FakePool:
    """Points end as scripted: run name -> outcomes of its attempts ((error, died), ...)."""

    def __init__(self, script):
        self.script, self.started, self.stopped = script, [], []

    def submit(self, point, run_name):
        self.started.append(run_name)
        return (run_name, len(self.started))

    def wait(self, handles):
        h = handles[0]
        return [(h, *self.script[h[0]].pop(0))]

    def stop(self, handles):
        self.stopped += handles
        return [(h, "interrupted", False) for h in handles]


def test_drive_retries_dead_workers_only_and_at_most_retries_times():
    pool = FakePool({"a": [("died", True), (None, False)], "b": [("boom", False)],
                     "c": [("died", True), ("died", True)]})
    done, retried = {}, []
    drive(pool, [([], "a"), ([], "b"), ([], "c")], 2, 1, done.__setitem__,
          lambda rn, why: retried.append((rn, why)))
    assert pool.started == ["a", "b", "c", "a", "c"]
    assert done == {"b": "boom", "a": None, "c": "died; re-run the sweep to resume it"}
    assert retried == [("a", "died; resumed from its last checkpoint"),
                       ("c", "died; resumed from its last checkpoint")]


def test_drive_stops_the_running_points_on_ctrl_c():
    class Interrupted(FakePool):
        def wait(self, handles):
            raise KeyboardInterrupt

    pool, done = Interrupted({}), {}
    with pytest.raises(KeyboardInterrupt):
        drive(pool, [([], "a"), ([], "b"), ([], "c")], 2, 1, done.__setitem__, None)
    assert [h[0] for h in pool.stopped] == ["a", "b"] and done == {"a": "interrupted",
                                                                 "b": "interrupted"}
