"""A real kill: train in a subprocess, SIGKILL it once a checkpoint exists, resume, and
compare everything with an uninterrupted run, bit for bit (float64)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from graddyn.experiments import default_run_name, parse_overrides, run_experiment
from graddyn.experiments._smoke import SmokeConfig
from graddyn.train import RunStore

ARGS = ["steps=60", "checkpoint_every=10", "eval_every=5", "noise=0.25"]


def test_resume_after_sigkill_is_bit_for_bit(tmp_path):
    killed_root, ref_root = tmp_path / "killed", tmp_path / "ref"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADDYN_QUIET": "1"}
    err = open(tmp_path / "stderr.txt", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "graddyn", "run", "smoke", "--root", str(killed_root),
         "--quiet", "--set", *ARGS, "sleep=0.05"],
        env=env, stdout=subprocess.DEVNULL, stderr=err,
    )
    name = default_run_name("smoke", parse_overrides(SmokeConfig, [*ARGS, "sleep=0.05"]))
    ckpts = killed_root / name / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not list(ckpts.glob("step_*10.pt")):
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
        time.sleep(0.05)
    time.sleep(0.2)  # let it log a few steps past the checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    err.close()
    store = RunStore(killed_root)
    run = store.open(name)
    assert run.status == "interrupted"  # killed: its lock went with it
    last = run.latest_checkpoint()[0]
    assert 10 <= last < 60
    with pytest.warns(UserWarning, match=f"last written by pid {proc.pid} .* taking it over"):
        resumed = run_experiment("smoke", root=killed_root, run_name=run.name, resume=True,
                                 progress=False)
    ref = run_experiment("smoke", ARGS, root=ref_root, progress=False)
    assert resumed.status == "finished"
    names = resumed.metric_names()
    assert names == ref.metric_names()
    for name in names:
        (s1, v1), (s2, v2) = resumed.history(name), ref.history(name)
        assert s1.tolist() == s2.tolist() and v1.tobytes() == v2.tobytes(), name
    w1 = resumed.latest_checkpoint()[1]["model"]
    w2 = ref.latest_checkpoint()[1]["model"]
    assert all(torch.equal(w1[k], w2[k]) for k in w2)
