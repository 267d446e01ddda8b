"""Experiment ``frequency-principle``: a tiny config runs and reports in seconds."""

import math

import numpy as np
import pytest

from graddyn.experiments import EXPERIMENTS, config_to_dict
from graddyn.experiments.frequency_principle import (
    ALL_OPTIMIZERS,
    FrequencyPrincipleConfig,
    first_converged,
    low_first_verdict,
    make_network,
    make_problem,
    order_effects,
    report_frequency_principle,
    run_frequency_principle,
)
from graddyn.train import RunStore

TINY = FrequencyPrincipleConfig(
    width=6, n_points=32, max_evals=80, n_records=6, pso_popsize=8, seeds=(1, 2)
)


def test_tiny_run_and_report(tmp_path):
    run = RunStore(tmp_path).create("tiny", config_to_dict(TINY))
    run_frequency_principle(TINY, run)
    for method in ALL_OPTIMIZERS:
        for seed in (1, 2):
            names = {f"seed{seed}/{method}/rel_err_k{k}" for k in (1, 3, 5)}
            assert names <= set(run.metric_names())
        steps, _ = run.history(f"seed2/{method}/rel_err_k1")
        assert steps[-1] == 80 and len(steps) == 6  # same schedule for every method
    paths = report_frequency_principle([run], tmp_path / "out")
    assert [p.name for p in paths] == ["tiny_heatmaps.png", "tiny_summary.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
    summary = (tmp_path / "out" / "tiny_summary.md").read_text()
    for method in ALL_OPTIMIZERS:
        assert f"| {method} |" in summary
    assert "low first" in summary and "freq 1 | freq 3 | freq 5" in summary
    assert "Student-t interval" in summary and "censored" in summary


def test_resume_skips_finished_optimizers(tmp_path):
    cfg = FrequencyPrincipleConfig(optimizers=("bfgs", "powell"), width=3, max_evals=20,
                                   seeds=(0,))
    run = RunStore(tmp_path).create("r", config_to_dict(cfg))
    run.log(20, {"seed0/bfgs/final_loss": 123.0})  # as if bfgs finished before a kill
    run_frequency_principle(cfg, run)
    assert run.history("seed0/bfgs/final_loss")[1].tolist() == [123.0]
    assert "seed0/bfgs/rel_err_k1" not in run.metric_names()
    assert "seed0/powell/rel_err_k1" in run.metric_names()


def test_report_needs_records(tmp_path):
    run = RunStore(tmp_path).create("empty", config_to_dict(TINY))
    with pytest.raises(ValueError, match="run it first"):
        report_frequency_principle([run], tmp_path / "out")


def test_problem_and_network():
    x, y = make_problem(FrequencyPrincipleConfig(target="sin14", n_points=40))
    assert x.shape == (40, 1) and y.shape == (40, 1)
    assert x[0, 0] == -10.0 and x[-1, 0] == pytest.approx(9.5)
    cfg = FrequencyPrincipleConfig(activation="relu", width=7)
    a, b = make_network(cfg, 0), make_network(cfg, 0)
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert sum(p.numel() for p in a.parameters()) == 3 * 7 + 1


def test_optimizers_from_comma_string():
    assert FrequencyPrincipleConfig(optimizers="bfgs, pso").optimizers == ("bfgs", "pso")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizers": ("sgd", "newton")}, "valid: adam, bfgs, cg, lbfgs, powell, pso, sgd"),
        ({"optimizers": ()}, "none given"),
        ({"target": "square"}, "valid: sin135, sin14"),
        ({"activation": "gelu"}, "valid: tanh, relu"),
        ({"max_evals": 0}, "max_evals must be > 0"),
        ({"width": -1}, "width must be > 0"),
        ({"threshold": 1.5}, "threshold must be in"),
        ({"seeds": ()}, "seeds must be a non-empty list"),
    ],
)
def test_bad_config_names_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FrequencyPrincipleConfig(**kwargs)


def test_first_converged():
    evals = np.array([1, 10, 100, 1000])
    errors = np.array([[0.9, 0.05, 0.2, 0.01], [1.0, 0.5, 0.09, 0.0], [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(first_converged(evals, errors, 0.1), [10, 100, math.inf])


def test_low_first_verdict_on_known_orders():
    inf = math.inf
    ordered = np.array([[4, 40, 400], [3, 50, 300], [5, 35, 500]], float)
    assert low_first_verdict(ordered, 1000)[0] == "holds"
    assert low_first_verdict(ordered[:, ::-1], 1000)[0] == "fails"
    tie = np.array([[4, 4, 400], [3, 3, 300], [5, 5, 500]], float)  # freq 1 and 3 tie
    assert low_first_verdict(tie, 1000)[0] == "fails"  # a tie is no support
    never = np.array([[4, 40, inf], [3, 50, inf], [5, 35, inf]])  # the highest never
    word, parts = low_first_verdict(never, 1000)
    assert word == "inconclusive" and "3 censored" in parts[1]
    assert low_first_verdict(ordered[:1], 1000)[0] == "inconclusive"  # one seed
    np.testing.assert_array_equal(order_effects([inf, inf], 1000), [np.nan])


def test_registered():
    exp = EXPERIMENTS.get("frequency-principle")
    assert exp.Config is FrequencyPrincipleConfig
    assert exp().demo_config().max_evals < FrequencyPrincipleConfig().max_evals
