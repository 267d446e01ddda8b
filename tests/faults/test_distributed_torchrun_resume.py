"""``torchrun -m graddyn run lsgd``: SIGKILL rank 1 half-way, then resume with ``--name NAME
--resume`` alone. Every rank takes the saved config from the run store, the job finishes
with the numbers of an uninterrupted job, and no scratch folder is left in the temp
directory."""

import os
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from graddyn.train import RunStore

from ._helpers import ENV, assert_same_metrics, wait_for

pytestmark = [pytest.mark.fault, pytest.mark.distributed]

SETTINGS = ["algorithm=lsgd", "backend=gloo", "steps=3000", "eval_every=100", "width=16",
            "checkpoint_every=500", "timeout_s=20"]


def _torchrun(root, *args, tag=""):
    torchrun = Path(sys.executable).parent / "torchrun"
    argv = [str(torchrun), "--nproc-per-node", "2", "-m", "graddyn", "run", "lsgd",
            "--root", str(root), "--quiet", *args]
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE")}
    return argv, {**env, "GRADDYN_FAULT_TAG": tag}


def _rank_pid(tag, rank):
    """pid of the torchrun worker of ``rank`` in the job tagged ``tag`` (None if not yet)."""
    for entry in Path("/proc").iterdir():
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"GRADDYN_FAULT_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def test_dead_rank_then_resume_with_resume_alone(tmp_path):
    before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("graddyn-rank")}
    root, tag = tmp_path / "runs", uuid.uuid4().hex
    argv, env = _torchrun(root, "--name", "d1", "--set", *SETTINGS, tag=tag)
    log = tmp_path / "first.txt"
    job = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))  # noqa: SIM115
    wait_for(lambda: (root / "d1/checkpoints/step_00000500.pt").is_file(), job, log=log)
    pid = _rank_pid(tag, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert job.wait(timeout=180) != 0
    run = RunStore(root).open("d1")
    assert run.status in ("failed", "interrupted")
    assert max(s for s, _ in run.checkpoints()) < 3000  # really cut short

    argv, env = _torchrun(root, "--name", "d1", "--resume")  # no --set at all
    resumed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert RunStore(root).open("d1").status == "finished"

    argv, env = _torchrun(tmp_path / "ref", "--name", "d1", "--set", *SETTINGS)
    ref = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert_same_metrics(RunStore(root).open("d1"), RunStore(tmp_path / "ref").open("d1"),
                        skip=("wall_s",))  # wall-clock is the one thing that differs
    after = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("graddyn-rank")}
    assert after == before
