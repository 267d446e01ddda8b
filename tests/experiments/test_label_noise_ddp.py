"""``torchrun --nproc-per-node 2 -m graddyn run coherent-gradients.label-noise --set ddp=true``
(gloo): each rank trains on half of every minibatch in DistributedDataParallel, the batch
instruments (f_p / f_c, coherence) measure the whole minibatch, only rank 0 writes, and the
run records what one process records (float32: equal up to rounding)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from graddyn.experiments import run_experiment
from graddyn.train import RunStore

pytestmark = pytest.mark.distributed

NAME = "coherent-gradients.label-noise"
TINY = ["dataset=digits", "n_train=200", "width=16", "steps=8", "batch_size=20", "eval_points=2",
        "split_steps=4", "coherence_points=2", "noise_levels=0.5", "null_worlds=1", "seeds=0"]


def test_ddp_run_records_what_one_process_records(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    argv = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "graddyn", "run", NAME,
            "--root", str(tmp_path / "ddp"), "--name", "d", "--quiet", "--set", *TINY,
            "ddp=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADDYN_QUIET": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-4000:]
    run = RunStore(tmp_path / "ddp").open("d")
    assert run.status == "finished" and run.config["ddp"] is True
    torch.set_default_dtype(torch.float32)  # as in the torchrun processes: the same init
    ref = run_experiment(NAME, TINY, root=tmp_path / "one", progress=False)
    names = ref.metric_names()
    assert run.metric_names() == names
    assert {"seed0/noise50/group_split/f_p", "seed0/noise50/batch_coherence/alpha"} <= set(names)
    for name in names:
        (s1, v1), (s2, v2) = run.history(name), ref.history(name)
        assert s1.tolist() == s2.tolist(), name
        np.testing.assert_allclose(v1, v2, rtol=1e-4, atol=1e-5, err_msg=name)


def test_ddp_without_torchrun_names_the_launch(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="ddp=true needs one process per rank: launch with "
                                           "`torchrun --nproc-per-node N"):
        run_experiment(NAME, [*TINY, "ddp=true"], root=tmp_path, progress=False)
