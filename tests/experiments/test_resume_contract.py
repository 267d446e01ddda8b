"""The resume contract of ``experiments/_base.py``, generated from the registry: every
experiment, at its smallest config, stopped midway (Ctrl-C at about half of its records) and
resumed, records exactly what an uninterrupted run records. Trainer-based studies continue
from their checkpoints; studies with their own loops redo the unfinished seed or pair."""

import pytest

from graddyn.experiments import EXPERIMENTS, run_experiment
from graddyn.experiments._runner import RunInterrupted
from graddyn.train import Run

# name -> overrides of its smallest config (a new experiment must add itself here)
SMALLEST = {
    "adm-vs-gd": ["n_images=2", "size=12", "width=4", "warmup_steps=2", "outer=2",
                  "inner_steps=2", "seeds=0,1"],
    "adversarial-bias": ["n_train=30", "dim=3", "steps=300", "n_records=8", "net_width=6",
                         "net_steps=20", "pgd_steps=2", "seeds=0,1"],
    "coherent-gradients.label-noise": ["dataset=digits", "n_train=200", "width=16", "steps=12",
                                       "eval_points=3", "split_steps=4", "coherence_points=2",
                                       "noise_levels=0,0.5", "seeds=0"],
    "coherent-gradients.median-of-3": ["dataset=digits", "n_train=200", "steps=12", "width=16",
                                       "depth=1", "seeds=0,1", "eval_points=3",
                                       "batch_size=20", "optimizers=sgd,m3"],
    "coherent-gradients.winsorize": ["dataset=digits", "n_train=100", "width=8", "depth=1",
                                     "steps=6", "batch_size=20", "eval_points=3", "noise=0.5",
                                     "seeds=0,1"],
    "frequency-principle": ["width=6", "n_points=32", "max_evals=80", "n_records=6",
                            "pso_popsize=8", "seeds=1,2", "optimizers=adam,lbfgs"],
    "gradient-confusion": ["study=depth", "depths=0,2", "width=8", "seeds=0,1", "epochs=1",
                           "batch_size=32", "max_train=96", "mb_count=3", "mb_size=16",
                           "probe_size=6", "evals_per_epoch=1", "target_acc=0.2"],
    "gradient-transfer": ["max_train=240", "max_test=80", "width=16", "depth=1", "epochs=3",
                          "alphas=0,1,2", "ewc_lambdas=100", "n_points=3", "seeds=0,1"],
    "learned-init": ["clf_width=16", "clf_steps=30", "pgd_steps=4", "n_fit=60", "n_eval=20",
                     "n_tasks_fit=4", "n_tasks_eval=2", "sine_width=5", "solve_steps=30",
                     "budget=20", "seeds=0,1"],
    "lsgd": ["workers=1,2", "algorithms=lsgd", "steps=10", "eval_every=5", "width=8",
             "timeout_s=30", "seeds=0", "checkpoint_every=5"],
    "optimum-shifting": ["models=cnn", "width=2", "cnn_channels=2,4", "cnn_hidden=24",
                         "seeds=0,1", "steps=4", "eig_tol=0.1", "batch_size=16",
                         "weight_decays=0.0", "sos_every=2", "sos_batch=8", "os_rows=16",
                         "curv_rows=16", "trace_probes=2", "last_probes=2", "eval_every=2",
                         "curv_every=2", "subset=80"],
    "smoke": ["steps=12", "checkpoint_every=4", "eval_every=2"],
    "tracin.mislabel": ["max_train=150", "epochs=4", "width=16", "n_checkpoints=4",
                        "batch_size=25", "seeds=0,1"],
}
CLOCKS = ("wall_s", "seconds")  # wall-clock records differ between any two runs


def test_every_experiment_has_a_smallest_config():
    assert set(SMALLEST) == set(EXPERIMENTS.names())


def _stop_after(monkeypatch, name: str, calls: int) -> list[int]:
    """Ctrl-C at the ``calls + 1``-th record (lsgd: the pair launched after ``calls``, its
    records are written by worker processes); ``calls=-1`` only counts. Returns the count."""
    import graddyn.experiments.lsgd as lsgd

    seen = [0]
    target, attr = (lsgd, "launch") if name == "lsgd" else (Run, "log")
    real = getattr(target, attr)

    def counting(*args, **kwargs):
        seen[0] += 1
        if seen[0] == calls + 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attr, counting)
    return seen


def _records(run) -> dict[str, tuple[list[int], bytes]]:
    out = {}
    for n in run.metric_names():
        if not n.endswith(CLOCKS):
            steps, values = run.history(n)
            out[n] = (steps.tolist(), values.tobytes())
    return out


@pytest.mark.parametrize("name", sorted(SMALLEST))
def test_stopped_and_resumed_records_what_an_uninterrupted_run_records(name, tmp_path,
                                                                        monkeypatch):
    args = SMALLEST[name]
    seen = _stop_after(monkeypatch, name, -1)
    whole = run_experiment(name, args, root=tmp_path / "a", run_name="r", progress=False)
    monkeypatch.undo()
    assert seen[0] >= 2, "too few records to stop midway"
    _stop_after(monkeypatch, name, seen[0] // 2)
    with pytest.raises(RunInterrupted):
        run_experiment(name, args, root=tmp_path / "b", run_name="r", progress=False)
    monkeypatch.undo()
    resumed = run_experiment(name, root=tmp_path / "b", run_name="r", resume=True,
                             progress=False)
    assert resumed.status == "finished"
    assert _records(resumed) == _records(whole)
