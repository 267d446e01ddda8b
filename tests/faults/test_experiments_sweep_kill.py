"""SIGKILL one worker of a running sweep without retries (``--retries 0``): the other points
finish, the killed point's run is marked interrupted and named in the manifest, and re-running
the sweep resumes it exactly. (With retries, the default, the sweep resumes it itself:
``tests/experiments/test_framework_sweep_retry.py``.)"""

import json
import os
import signal
import subprocess

import pytest

from graddyn.experiments import default_run_name, parse_overrides, run_experiment
from graddyn.experiments._smoke import SmokeConfig
from graddyn.train import RunStore

from ._helpers import ENV, assert_same_metrics, graddyn, start, wait_for

pytestmark = pytest.mark.fault

BASE = ["steps=40", "checkpoint_every=5", "eval_every=5", "sleep=0.1"]
GRID = ["noise=0,0.25,0.5,0.75"]


def _holder_pid(lock):
    text = lock.read_text() if lock.is_file() else ""
    return json.loads(text)["pid"] if text.strip() else None


def test_killed_worker_takes_down_only_its_point(tmp_path):
    root, log = tmp_path / "runs", tmp_path / "stderr.txt"
    argv = graddyn("sweep", "smoke", "--root", str(root), "--grid", *GRID, "--set", *BASE,
                   "--workers", "2", "--name", "sk", "--retries", "0")
    proc = start(argv, log)
    first = default_run_name("smoke", parse_overrides(SmokeConfig, [*BASE, "noise=0"]))
    victim_ckpt = root / first / "checkpoints" / "step_00000010.pt"
    wait_for(lambda: victim_ckpt.is_file() and _holder_pid(root / first / "lock"), proc,
             log=log)
    victim = _holder_pid(root / first / "lock")
    os.kill(victim, signal.SIGKILL)  # the worker, not the sweep: its pid is in the lock
    assert proc.wait(timeout=300) == 1
    err = log.read_text()
    assert f"failed {first}: worker process {victim} killed by SIGKILL" in err
    manifest = json.loads((root / "sk" / "sweep.json").read_text())
    assert manifest["status"][first] == "interrupted"
    assert sorted(manifest["status"].values()) == ["finished"] * 3 + ["interrupted"]
    assert list(manifest["errors"]) == [first] and "SIGKILL" in manifest["errors"][first]
    run = RunStore(root).open(first)
    assert run.status == "interrupted" and "killed by SIGKILL" in run.get_meta("error")

    again = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "4 runs, 3 already finished, 0 failed" in again.stdout
    manifest = json.loads((root / "sk" / "sweep.json").read_text())
    assert set(manifest["status"].values()) == {"finished"} and manifest["errors"] == {}
    ref = run_experiment("smoke", [*BASE, "noise=0"], root=tmp_path / "ref", progress=False)
    assert_same_metrics(RunStore(root).open(first), ref)
