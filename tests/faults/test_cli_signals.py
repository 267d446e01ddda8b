"""``graddyn run`` as a real process: Ctrl-C (SIGINT) and SIGTERM print one line with the
resume command, which continues the run exactly; a second writer is refused while the first
lives and a SIGKILLed writer's lock is taken over."""

import json
import os
import shlex
import signal
import subprocess

import pytest

from graddyn.experiments import run_experiment, show
from graddyn.train import RunStore

from ._helpers import ENV, assert_same_metrics, graddyn, start, wait_for

pytestmark = pytest.mark.fault

ARGS = ["steps=60", "checkpoint_every=10", "eval_every=5", "noise=0.25"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    return run_experiment("smoke", ARGS, root=root, run_name="ref", progress=False)


def _start_slow_run(root, name, log):
    proc = start(graddyn("run", "smoke", "--root", str(root), "--name", name, "--quiet",
                         "--set", *ARGS, "sleep=0.05"), log)
    wait_for(lambda: (root / name / "checkpoints" / "step_00000010.pt").is_file(), proc,
             log=log)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_signal_prints_one_line_and_its_command_resumes_exactly(tmp_path, reference, sig):
    root, log = tmp_path / "runs", tmp_path / "stderr.txt"
    proc = _start_slow_run(root, "s", log)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 130
    lines = log.read_text().strip().splitlines()
    assert len(lines) == 1, lines
    command = lines[0].split("resume with: ")[1]
    assert command == f"graddyn run smoke --name s --root {root} --resume"
    run = RunStore(root).open("s")
    assert run.status == "interrupted"
    assert run.get_meta("error") == ("stopped by Ctrl-C" if sig == signal.SIGINT
                                     else "stopped by SIGTERM")
    assert not list((root / "s").rglob("*.tmp"))
    argv = graddyn(*shlex.split(command)[1:])  # exactly the printed command
    done = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = RunStore(root).open("s")
    assert resumed.status == "finished"
    assert_same_metrics(resumed, reference)


def test_second_writer_refused_then_dead_writers_lock_taken_over(tmp_path, reference):
    root, log = tmp_path / "runs", tmp_path / "stderr.txt"
    proc = _start_slow_run(root, "w", log)
    os.kill(proc.pid, signal.SIGSTOP)  # alive and holding the lock, however slow the machine
    second = subprocess.run(graddyn("run", "smoke", "--root", str(root), "--name", "w",
                                    "--resume", "--quiet"),
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert f"being written by pid {proc.pid}" in second.stderr
    assert f"status     running  (pid {proc.pid} on " in show("w", root=root)
    proc.kill()
    proc.wait()
    holder = json.loads((root / "w" / "lock").read_text())
    assert holder["pid"] == proc.pid  # the record a killed writer leaves behind
    run = RunStore(root).open("w")
    assert run.status == "interrupted" and run.get_meta("status") == "running"
    resumed = subprocess.run(graddyn("run", "smoke", "--root", str(root), "--name", "w",
                                     "--resume", "--quiet"),
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"last written by pid {proc.pid}" in resumed.stderr  # taken over, and said so
    assert (root / "w" / "lock").read_text() == ""  # released cleanly this time
    assert_same_metrics(RunStore(root).open("w"), reference)
