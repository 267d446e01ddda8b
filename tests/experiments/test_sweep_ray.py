"""``graddyn sweep --backend ray`` on a real local Ray cluster: a Ray worker killed mid-run
is retried from its last checkpoint, the other point finishes, nothing recorded is lost, and
the cluster the sweep started is stopped; ``--address`` joins an existing cluster and leaves
it running (marked slow: a second cluster start)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

from graddyn.experiments import run_sweep

from .test_framework_sweep_retry import BASE, QUIET, check_resumed, kill_mid_run

ray = pytest.importorskip("ray")


def sweep(root, *args):
    return [sys.executable, "-m", "graddyn", "sweep", "smoke", "--root", str(root),
            "--backend", "ray", *args]


def test_killed_ray_worker_resumes_and_the_other_point_finishes(tmp_path):
    root = tmp_path / "runs"
    argv = sweep(root, "--grid", "noise=0,0.5", "--set", *BASE, "--workers", "2", "--name", "rk")
    done, first, _ = kill_mid_run(argv, root, tmp_path / "stderr.txt")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 runs, 0 already finished, 0 failed, 1 retried" in done.stdout
    check_resumed(root, "rk", first, tmp_path / "ref", "Ray worker died before it reported")
    assert json.loads((root / "rk" / "sweep.json").read_text())["backend"] == "ray"


@pytest.mark.slow
def test_address_joins_an_existing_cluster_and_leaves_it_running(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # as `ray start`
    try:
        address = ray.get_runtime_context().gcs_address
        root = tmp_path / "runs"
        done = subprocess.run(sweep(root, "--address", address, "--grid", "noise=0,0.5",
                                    "--set", "steps=3", "--workers", "2", "--name", "join"),
                              env={**os.environ, **QUIET}, capture_output=True, text=True,
                              timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        manifest = json.loads((root / "join" / "sweep.json").read_text())
        assert set(manifest["status"].values()) == {"finished"} and manifest["retried"] == {}
        assert ray.cluster_resources()["CPU"] == 2  # still running
    finally:
        ray.shutdown()


def test_missing_ray_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'graddyn\[cluster\]'"):
        run_sweep("smoke", ["noise=0,0.5"], ["steps=2"], root=tmp_path, backend="ray")
