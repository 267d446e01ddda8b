"""SIGKILL a label-noise run at every one of its steps, in turn, at a different moment of the
step each time (mid-checkpoint-write included), resuming after each kill: the final metrics
and checkpoint equal an uninterrupted run's bit for bit, the per-minibatch measurement window
(steps 1-6) included."""

import subprocess
import sys

import pytest
import torch

from graddyn.train import RunStore

from ._helpers import ENV, assert_same_metrics

pytestmark = pytest.mark.fault

NAME = "coherent-gradients.label-noise"
ARGS = ["dataset=digits", "n_train=300", "width=64", "steps=12", "eval_points=4",
        "split_steps=6", "coherence_points=4", "noise_levels=0.5"]  # checkpoints every 3
STEPS = 12
# Moments of a step: the kill at step k uses MOMENTS[k % 3], except at steps 3 and 9, where it
# dies half-way through writing the step's checkpoint (a temp file cut short).
MOMENTS = ["batch-start", "after-backward", "after-step"]

SCRIPT = """
import os, signal, sys
from graddyn.experiments import run_experiment
from graddyn.train import Event
import graddyn.train._store as store_module
import graddyn.train._trainer as trainer_module

root, step, moment, name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
args = sys.argv[5:]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
events = {"batch-start": Event.BATCH_START, "after-backward": Event.AFTER_BACKWARD,
          "after-step": Event.AFTER_STEP}
fire = trainer_module.Trainer._fire
write = store_module.write_bytes

def fire_and_die(self, event, st):
    fire(self, event, st)
    # BATCH_START / AFTER_BACKWARD of step k see st.step == k - 1, AFTER_STEP sees k
    at = st.step + (event != Event.AFTER_STEP)
    if moment in events and event == events[moment] and at == step:
        die()

def write_and_die(path, data):
    if moment == "checkpoint" and path.name == f"step_{step:08d}.pt.tmp":
        with open(path, "wb") as f:
            f.write(bytes(data)[: len(data) // 2])
        die()
    write(path, data)

trainer_module.Trainer._fire = fire_and_die
store_module.write_bytes = write_and_die
run_experiment(name, args, root=root, run_name="k", resume="if-exists", progress=False)
"""


def _attempt(root, step, moment):
    return subprocess.run([sys.executable, "-c", SCRIPT, str(root), str(step), moment, NAME,
                           *ARGS], env=ENV, capture_output=True, text=True, timeout=300)


def test_kill_at_every_step_then_resume_is_bit_for_bit(tmp_path):
    root = tmp_path / "runs"
    # the reference runs the same way (a process with the same thread count: float32 sums
    # depend on how many threads split them)
    assert _attempt(tmp_path / "ref", 0, "none").returncode == 0
    ref = RunStore(tmp_path / "ref").open("k")
    for step in range(1, STEPS):
        moment = "checkpoint" if step in (3, 9) else MOMENTS[step % 3]
        proc = _attempt(root, step, moment)
        assert proc.returncode == -9, (step, moment, proc.stderr[-2000:])
        run = RunStore(root).open("k")
        assert run.status == "interrupted"
        assert run.history("noise50/train/batch_loss")[0].max(initial=0) <= step
        assert not list(root.rglob("*.tmp")) or moment == "checkpoint"
    proc = _attempt(root, 0, "none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = RunStore(root).open("k")
    assert run.status == "finished"
    assert any(n.startswith("noise50/group_split/") for n in run.metric_names())
    assert_same_metrics(run, ref)
    (s1, c1), (s2, c2) = run.latest_checkpoint("noise50"), ref.latest_checkpoint("noise50")
    assert s1 == s2 == STEPS
    assert all(torch.equal(c1["model"][k], c2["model"][k]) for k in c2["model"])
