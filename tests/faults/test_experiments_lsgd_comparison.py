"""``graddyn run lsgd`` without torchrun (the comparison), stopped by SIGTERM inside a pair:
the evaluations made so far are in the run, and the printed command resumes the pair from
its checkpoint to the numbers of an uninterrupted comparison."""

import shlex
import signal
import subprocess

import pytest

from graddyn.experiments import run_experiment
from graddyn.train import RunStore

from ._helpers import ENV, assert_same_metrics, graddyn, start, wait_for

pytestmark = [pytest.mark.fault, pytest.mark.distributed]

SETTINGS = ["workers=1,2", "algorithms=lsgd", "steps=3000", "eval_every=100",
            "checkpoint_every=500", "timeout_s=30"]


def test_stopped_comparison_keeps_its_records_and_resumes_the_pair(tmp_path):
    root, log = tmp_path / "runs", tmp_path / "stderr.txt"
    proc = start(graddyn("run", "lsgd", "--root", str(root), "--name", "c", "--quiet",
                         "--set", *SETTINGS), log)
    wait_for(lambda: (root / "c/checkpoints/lsgd/w2/step_00000500.pt").is_file(), proc,
             log=log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    line, = log.read_text().strip().splitlines()
    run = RunStore(root).open("c")
    assert run.status == "interrupted"
    steps, _ = run.history("lsgd/w2/test_error")
    assert 500 <= steps.max() < 3000  # recorded while the pair ran, not lost
    command = line.split("resume with: ")[1]
    done = subprocess.run(graddyn(*shlex.split(command)[1:]), env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = run_experiment("lsgd", SETTINGS, root=tmp_path / "ref", run_name="c",
                         progress=False)
    assert_same_metrics(RunStore(root).open("c"), ref, skip=("wall_s",))
