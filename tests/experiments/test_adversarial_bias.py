"""Experiment ``adversarial-bias``: a tiny config runs and reports in seconds."""

import numpy as np
import pytest

from graddyn.experiments import EXPERIMENTS, config_to_dict
from graddyn.experiments.adversarial_bias import (
    AdversarialBiasConfig,
    loglog_slope,
    report_adversarial_bias,
    run_adversarial_bias,
)
from graddyn.train import RunStore

TINY = AdversarialBiasConfig(n_train=30, dim=3, steps=300, n_records=8, net_width=6,
                             net_steps=20, pgd_steps=2, seeds=(0, 1))


def test_tiny_run_and_report(tmp_path):
    run = RunStore(tmp_path).create("tiny", config_to_dict(TINY))
    run_adversarial_bias(TINY, run)
    names = set(run.metric_names())
    for seed in (0, 1):
        p = f"seed{seed}/"
        for v in ("clean", "l2", "linf"):
            assert {f"{p}{v}/angle", f"{p}{v}/margin", f"{p}{v}/robust_margin",
                    f"{p}{v}/loglog_slope"} <= names
            steps, angles = run.history(f"{p}{v}/angle")
            assert steps[-1] == 300 and angles[-1] < angles[0]  # moves towards its target
        assert {f"{p}net/robust_margin", f"{p}net/clean_margin", f"{p}linf/angle_l2"} <= names
        _, robust = run.history(f"{p}l2/robust_margin")
        assert robust[-1] > 0  # robustly separates at the end
    assert run.history("seed0/l2_max_margin")[1][0] != run.history("seed1/l2_max_margin")[1][0]
    paths = report_adversarial_bias([run], tmp_path / "out")
    assert [p.name for p in paths] == ["tiny_adversarial_bias.png"]
    assert paths[0].stat().st_size > 10_000
    verdict = (tmp_path / "out" / "tiny_verdict.md").read_text()
    assert "Student-t interval" in verdict and "| (4) the network" in verdict
    assert EXPERIMENTS.get("adversarial-bias")().demo_config().steps == 2000


def test_verdicts_on_known_values():
    from graddyn.experiments.adversarial_bias import verdicts

    rows = verdicts(np.array([-0.05, -0.06, -0.04]), np.array([-0.6, -0.55, -0.62]),
                    np.array([0.01, 0.02, 0.01]), np.array([0.3, 0.35, 0.32]),
                    np.array([0.1, 0.12, 0.11]))
    assert [r.verdict for r in rows] == ["holds"] * 4
    same = np.array([-0.3, -0.31, -0.29])
    null = verdicts(same, same, np.array([0.3, 0.2, 0.4]), np.array([0.3, 0.4, 0.2]), None)
    assert [r.verdict for r in null] == ["fails", "fails", "inconclusive"]
    nan = verdicts(np.array([-0.05, np.nan]), np.array([-0.6, -0.5]), np.ones(2), np.ones(2),
                   None)
    assert nan[0].verdict == "inconclusive"


def test_loglog_slope():
    t = np.array([1.0, 10.0, 100.0, 1000.0])
    assert loglog_slope(t, 3 * t**-0.5) == pytest.approx(-0.5)
    assert np.isnan(loglog_slope(np.array([1.0]), np.array([1.0])))


def test_report_needs_records(tmp_path):
    run = RunStore(tmp_path).create("empty", config_to_dict(TINY))
    with pytest.raises(ValueError, match="run it first"):
        report_adversarial_bias([run], tmp_path / "out")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps must be > 0"),
        ({"loss": "hinge"}, "valid: logistic, exponential"),
        ({"step_rule": "adam"}, "step_rule"),
        ({"eps_frac": 1.2}, "below the margin"),
        ({"lr": 0.0}, "lr and net_lr"),
        ({"seeds": ()}, "seeds must be a non-empty"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdversarialBiasConfig(**kwargs)
