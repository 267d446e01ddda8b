"""Experiment ``learned-init``: a tiny config runs and reports in seconds."""

import pytest
import torch

from graddyn.experiments import EXPERIMENTS, config_to_dict
from graddyn.experiments.learned_init import (
    LearnedInitConfig,
    class_mean_start,
    report_learned_init,
    run_learned_init,
    sine_task,
)
from graddyn.train import RunStore

TINY = LearnedInitConfig(clf_width=16, clf_steps=30, pgd_steps=4, n_fit=60, n_eval=20,
                         n_tasks_fit=4, n_tasks_eval=2, sine_width=5, solve_steps=30, budget=20,
                         seeds=(0, 1))


def test_tiny_run_and_report(tmp_path):
    run = RunStore(tmp_path).create("tiny", config_to_dict(TINY))
    run_learned_init(TINY, run)
    names = set(run.metric_names())
    for seed in (0, 1):
        for start in ("zero", "random", "class_mean", "learned"):
            steps, rate = run.history(f"seed{seed}/adv/{start}/success")
            assert steps.tolist() == list(range(5)) and (rate[1:] >= rate[:-1]).all()
            assert f"seed{seed}/adv/{start}/mean_iters" in names
        for start in ("random", "mean", "learned"):
            wanted = {f"seed{seed}/sine/{start}/{k}" for k in ("loss", "median_steps",
                                                                "reached")}
            assert wanted <= names
    paths = report_learned_init([run], tmp_path / "out")
    assert [p.name for p in paths] == ["tiny_learned_init.png"]
    verdict = (tmp_path / "out" / "tiny_verdict.md").read_text()
    assert "a learned start needs fewer steps than zero" in verdict
    assert EXPERIMENTS.get("learned-init")().demo_config().n_fit == 200


def test_verdicts_on_known_values():
    import numpy as np

    from graddyn.experiments.learned_init import verdicts

    adv = {"zero": np.array([8.0, 8.2, 7.9]), "learned": np.array([5.0, 5.1, 4.8])}
    sine = {"random": np.array([90.0, 95.0, 80.0]), "learned": np.array([90.0, 95.0, 80.0])}
    assert [r.verdict for r in verdicts(adv, sine)] == ["holds", "fails"]  # a tie fails


def test_helpers():
    x, y = sine_task(2.0, 0.5, n_points=8)
    assert x.shape == (8, 1) and torch.allclose(y, 2 * torch.sin(x + 0.5))
    means = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, -5.0]])
    start = class_mean_start(torch.tensor([[0.1, 0.0]]), torch.tensor([0]), means, 0.2)
    assert start.tolist() == [[0.2, 0.2]]  # towards class 1, the nearest other mean


def test_report_needs_records(tmp_path):
    run = RunStore(tmp_path).create("empty", config_to_dict(TINY))
    with pytest.raises(ValueError, match="run it first"):
        report_learned_init([run], tmp_path / "out")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"regressor": "svm"}, "valid: ridge, mlp"),
        ({"budget": 0}, "budget must be > 0"),
        ({"n_tasks_fit": 1}, ">= 2"),
        ({"eps": 0.0}, "eps, sine_lr"),
        ({"seeds": (1, 1)}, "seeds must be distinct"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LearnedInitConfig(**kwargs)


def test_too_few_solved_instances(tmp_path):
    cfg = LearnedInitConfig(clf_width=8, clf_steps=20, eps=1e-9, pgd_steps=1, n_fit=20)
    run = RunStore(tmp_path).create("r", config_to_dict(cfg))
    with pytest.raises(ValueError, match="raise eps or pgd_steps"):
        run_learned_init(cfg, run)
