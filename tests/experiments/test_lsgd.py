"""Experiment ``lsgd``: config checks, the comparison plan, a tiny real run and its report."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from graddyn._registry import UnknownNameError
from graddyn.experiments import EXPERIMENTS, report, run_experiment
from graddyn.experiments.lsgd import CIFAR10_CNN7, LSGDConfig, cnn7, plan

TINY = ["workers=1,2", "algorithms=lsgd,easgd", "steps=10", "eval_every=5", "width=8",
        "timeout_s=30", "seeds=0,1"]


@pytest.mark.parametrize("kw, match", [
    ({"algorithm": "leader"}, "valid names: data-parallel, easgd, lsgd, multi-lsgd"),
    ({"algorithms": ("lsgd", "sgd")}, "valid names"),
    ({"workers": (0, 2)}, "positive worker counts"),
    ({"pull": 1.5}, r"pull must be in \[0, 1\]"),
    ({"period": 0}, "period must be a positive int"),
    ({"checkpoint_every": -1}, "checkpoint_every must be >= 0"),
    ({"seeds": ()}, "seeds must be a non-empty"),
])
def test_bad_config_names_the_fix(kw, match):
    with pytest.raises((ValueError, UnknownNameError), match=match):
        LSGDConfig(**kw)


def test_plan_runs_sgd_alone_and_multi_leader_only_with_two_groups():
    pairs = plan(LSGDConfig())
    assert ("data-parallel", 1) in pairs and ("lsgd", 1) not in pairs
    assert ("multi-lsgd", 4) in pairs and ("multi-lsgd", 2) not in pairs
    assert len(plan(CIFAR10_CNN7)) == 3 + 4  # 4 workers: one group of 4, no multi-leader


def test_verdicts_on_known_histories(tmp_path):
    from graddyn.experiments._seeds import SeedRun
    from graddyn.experiments.lsgd import verdicts
    from graddyn.train import RunStore

    run = RunStore(tmp_path).create("r", {})
    for seed, jitter in ((0, 0.0), (1, 0.01), (2, -0.01)):
        for algo, err, mb in (("lsgd", 0.05, 1.0), ("easgd", 0.05, 2.0),
                              ("data-parallel", 0.20, 8.0)):
            for step in (10, 20, 30):
                run.log(step, {f"seed{seed}/{algo}/w2/test_error": err + jitter * (algo != "easgd"),
                               f"seed{seed}/{algo}/w2/comm_mb": mb * step / 30})
    rows = verdicts([SeedRun(run, s) for s in (0, 1, 2)])
    words = {r.prediction: r.verdict for r in rows}
    assert words["LSGD reaches a lower test error than data-parallel, 2 workers"] == "holds"
    assert words["LSGD reaches a lower test error than easgd, 2 workers"] == "inconclusive"
    assert words["LSGD sends less than data-parallel SGD, 2 workers"] == "holds"


def test_cnn7_shapes():
    assert cnn7((3, 32, 32), 10)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.distributed
def test_tiny_comparison_logs_every_pair_and_draws_the_figure(tmp_path):
    run = run_experiment("lsgd", TINY, root=tmp_path, run_name="t", progress=False)
    names = set(run.metric_names())
    for seed in (0, 1):
        for prefix in ("data-parallel/w1", "lsgd/w2", "easgd/w2"):
            steps, err = run.history(f"seed{seed}/{prefix}/test_error")
            assert list(steps) == [5, 10] and ((0 <= err) & (err <= 1)).all()
            assert f"seed{seed}/{prefix}/comm_mb" in names
        assert run.history(f"seed{seed}/data-parallel/w1/comm_mb")[1][-1] == 0.0
        assert run.history(f"seed{seed}/lsgd/w2/comm_mb")[1][-1] > 0.0
    html = report("t", root=tmp_path)
    assert (html.parent / "lsgd-t.png").is_file()
    verdict = (html.parent / "lsgd-t_verdict.md").read_text()
    assert "LSGD reaches a lower test error than easgd, 2 workers" in verdict
    assert EXPERIMENTS.get("lsgd")().demo_config().steps < LSGDConfig().steps


@pytest.mark.distributed
def test_comparison_records_as_it_goes_and_resumes_the_interrupted_pair(tmp_path):
    """A comparison stopped inside the lsgd pair (after its step-5 checkpoint, before the
    easgd pair) keeps what rank 0 recorded and continues that pair from its checkpoint."""
    cfg = [*TINY, "checkpoint_every=5"]
    whole = run_experiment("lsgd", cfg, root=tmp_path / "a", run_name="t", progress=False)
    assert [s for s, _ in whole.checkpoints("seed0/lsgd/w2")] == [5, 10]
    cut = run_experiment("lsgd", cfg, root=tmp_path / "b", run_name="t", progress=False)
    cut.truncate_after(5, prefix="seed0/lsgd/w2/")  # as a kill after step 5 leaves it
    cut.checkpoints("seed0/lsgd/w2")[-1][1].unlink()
    for later in ("seed0/easgd/w2", "seed1/data-parallel/w1", "seed1/lsgd/w2", "seed1/easgd/w2"):
        cut.truncate_after(-1, prefix=f"{later}/")  # not started yet
        for _, path in cut.checkpoints(later):
            path.unlink()
    cut.set_meta(status="interrupted")
    resumed = run_experiment("lsgd", root=tmp_path / "b", run_name="t", resume=True,
                             progress=False)
    assert resumed.status == "finished"
    for name in whole.metric_names():
        if not name.endswith("wall_s"):  # wall-clock differs; everything else is exact
            assert whole.history(name)[1].tobytes() == resumed.history(name)[1].tobytes(), name


@pytest.mark.slow
@pytest.mark.distributed
def test_under_torchrun_rank0_logs_and_checkpoints(tmp_path):
    """The real launcher and CLI: `torchrun -m graddyn run lsgd`. Only rank 0 writes the run
    folder (the other ranks read its config from it), so the ranks do not race to create it,
    and nothing is left in the temp folder."""
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc-per-node", "2", "-m", "graddyn", "run", "lsgd",
           "--root", str(tmp_path / "runs"), "--name", "tr"]
    for kv in ("algorithm=lsgd", "steps=10", "eval_every=5", "width=8", "checkpoint_every=5",
               "timeout_s=30"):
        cmd += ["--set", kv]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from graddyn.train import RunStore

    store = RunStore(tmp_path / "runs")
    assert store.exists("tr") and [p.name for p in (tmp_path / "runs").iterdir()] == ["tr"]
    run = store.open("tr")
    assert run.status == "finished"
    assert list(run.history("lsgd/w2/test_error")[0]) == [5, 10]
    assert [s for s, _ in run.checkpoints()] == [5, 10]
