"""Experiment ``tracin.mislabel``: a tiny config runs and reports in seconds."""

import numpy as np
import pytest
import torch

from graddyn.experiments import EXPERIMENTS, report, run_experiment
from graddyn.experiments.tracin import (
    TracInMislabelConfig,
    checkpoint_subset,
    fraction_found,
    report_tracin_mislabel,
)
from graddyn.influence import TracIn, checkpoints_from_run
from graddyn.train import RunStore

TINY = ["max_train=150", "epochs=4", "width=16", "n_checkpoints=4", "batch_size=25",
        "seeds=0,1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return root, run_experiment("tracin.mislabel", TINY, root=root, progress=False)


def test_registered():
    assert "tracin.mislabel" in EXPERIMENTS


def test_tiny_run_records_rankings(tiny):
    _, run = tiny
    assert run.status == "finished"
    for seed in (0, 1):
        terms = run.load_array(f"seed{seed}/self_influence_terms")
        mask = run.load_array(f"seed{seed}/corrupt_mask")
        assert terms.shape == (4, 150) and mask.shape == (150,) and mask.sum() == 15
        assert (terms >= 0).all()
        names = set(run.metric_names())
        for rank in ("self_influence_1ck", "self_influence_3ck", "self_influence_allck",
                     "final_loss", "random"):
            for pct in (10, 20, 30):
                _, v = run.history(f"seed{seed}/found@{pct}%/{rank}")
                assert 0.0 <= v[-1] <= 1.0
        assert {f"seed{seed}/self_influence/mean_corrupt"} <= names
        # the stored terms are TracIn's self-influence over the run's checkpoints
        assert len(checkpoints_from_run(run, f"seed{seed}")) == 4
    assert not np.array_equal(run.load_array("seed0/corrupt_mask"),
                              run.load_array("seed1/corrupt_mask"))


def test_terms_match_tracin(tiny):
    _, run = tiny
    from graddyn.experiments.tracin import _setup

    data, _, model = _setup(TracInMislabelConfig(max_train=150, width=16), seed=1)
    ckpts = checkpoints_from_run(run, "seed1")
    got = TracIn(model, ckpts).self_influence(data.train_x, data.train_y)
    np.testing.assert_allclose(got.numpy(),
                               run.load_array("seed1/self_influence_terms").sum(0), rtol=1e-5)


def test_report(tiny, tmp_path):
    root, run = tiny
    html = report(run.name, root=root, out_dir=tmp_path)
    assert html.exists()
    png = tmp_path / f"{run.name}_mislabel.png"
    assert png.stat().st_size > 10_000
    md = (tmp_path / f"{run.name}_summary.md").read_text()
    assert "| self_influence_allck |" in md and "| corrupt |" in md and "±" in md
    verdict = (tmp_path / f"{run.name}_verdict.md").read_text()
    assert "Student-t interval" in verdict and "than random" in verdict


def test_verdicts_on_known_values():
    from graddyn.experiments.tracin import verdicts

    good = {"found@10%/self_influence_allck": np.array([0.9, 0.92, 0.88]),
            "found@10%/random": np.array([0.1, 0.09, 0.11]),
            "found@10%/final_loss": np.array([0.9, 0.92, 0.88]),  # a tie with the baseline
            "log_ratio": np.array([1.2, 1.4, np.nan])}  # a NaN: no evidence
    words = [r.verdict for r in verdicts(good)]
    assert words == ["holds", "fails", "inconclusive"]


def test_report_needs_results(tmp_path):
    run = RunStore(tmp_path).create("empty", {})
    with pytest.raises(ValueError, match="run it first"):
        report_tracin_mislabel([run], tmp_path / "out")


def test_fraction_found_and_checkpoint_subset():
    scores = torch.tensor([0.3, 0.9, 0.1, 0.5])
    mask = torch.tensor([False, True, True, False])
    assert fraction_found(scores, mask).tolist() == [0.5, 0.5, 0.5, 1.0]
    assert checkpoint_subset(10, 1) == [9]
    assert checkpoint_subset(10, 3) == [0, 4, 9]
    assert checkpoint_subset(10, 0) == list(range(10))
    assert checkpoint_subset(2, 5) == [0, 1]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"model": "resnet"}, "unknown model 'resnet'"),
    ({"noise": 0.0}, "noise must be in \\(0, 1\\)"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"lr": -1.0}, "lr must be > 0"),
    ({"checkpoint_counts": (1, 11)}, "each in 0..n_checkpoints=10"),
    ({"checkpoint_counts": ()}, "must be non-empty"),
    ({"seeds": (2, 2)}, "seeds must be distinct"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TracInMislabelConfig(**kwargs)


@pytest.mark.parametrize(("overrides", "match"), [
    (["max_train=20", "batch_size=32"], "exceeds the 20 training examples"),
    (["max_train=40", "batch_size=20", "epochs=1", "n_checkpoints=3"],
     "2 training steps cannot hold n_checkpoints=3"),
])
def test_bad_run(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        run_experiment("tracin.mislabel", overrides, root=tmp_path, progress=False)
