"""coherent-gradients.median-of-3: a tiny run end to end, the pairing by seed, the verdict
logic on synthetic histories whose answer is known, and every raise."""

import json

import numpy as np
import pytest

from graddyn.data import load_dataset
from graddyn.experiments import EXPERIMENTS, ConfigError, parse_overrides, report, run_experiment
from graddyn.experiments.median_of_3 import (
    MedianOf3Config,
    draw_report,
    make_trainer,
    verdicts,
)
from graddyn.interventions.median_optim import M3, RA3

NAME = "coherent-gradients.median-of-3"
TINY = ["dataset=digits", "n_train=200", "steps=12", "width=16", "depth=1", "seeds=0,1",
        "eval_points=3", "batch_size=20"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return root, run_experiment(NAME, TINY, root=root, progress=False)


def test_registered_with_the_papers_momentum_free_defaults():
    assert NAME in EXPERIMENTS
    cfg = MedianOf3Config()
    assert cfg.optimizers == ("sgd", "m3", "a3", "rm3", "ra3") and len(cfg.seeds) >= 3
    assert (cfg.lr, cfg.batch_size, cfg.preprocess) == (0.1, 100, "scale")
    splits = load_dataset("digits", standardize=False)
    small = parse_overrides(MedianOf3Config, TINY)
    for opt, cls in (("m3", M3), ("ra3", RA3)):
        trainer = make_trainer(small, splits, opt, 0, None)
        assert type(trainer.optimizer) is cls
        assert all(g["momentum"] == 0 for g in trainer.optimizer.param_groups)


def test_tiny_run_records_and_reports(tiny):
    root, run = tiny
    names = set(run.metric_names())
    for seed in (0, 1):
        for opt in ("sgd", "m3", "a3", "rm3", "ra3"):
            assert f"seed{seed}/{opt}/learned_at/frac_learned_corrupt" in names
    out = report(run.name, root=root).parent
    data = json.loads((out / "verdict.json").read_text())
    assert [r["prediction"][:3] for r in data["rows"]] == ["(1)", "(2)", "(3)", "(4)"]
    assert "Student-t" in data["rule"] and data["parameters"]["seeds"] == "0,1"
    assert "| rm3 |" in (out / "summary.md").read_text()
    assert (out / "median-of-3.png").stat().st_size > 0


def test_optimizers_share_the_data_and_initial_weights_of_a_seed(tiny):
    _, run = tiny
    for seed in (0, 1):
        first = [run.history(f"seed{seed}/{o}/train/acc")[1][0] for o in ("sgd", "m3", "ra3")]
        assert first[0] == first[1] == first[2]  # step 0: the same model on the same data
    assert run.history("seed0/sgd/train/loss")[1][0] != run.history("seed1/sgd/train/loss")[1][0]


def _curve(values):
    values = np.asarray(values, float)
    return np.arange(len(values)), values


def _synthetic(paper_like: bool, seeds=(0, 1, 2)):
    """SGD and the averages memorise (corrupt fit -> 0.9); the medians do (paper_like) or do
    not; test accuracy the same for all."""
    hist = {}
    for s in seeds:
        d = 0.01 * s
        def opt(corrupt, d=d):
            return {"corrupt_fit": _curve([0.1, 0.5, corrupt + d, corrupt + d, corrupt + d]),
                    "test_acc": _curve([0.5, 0.8, 0.8 + d, 0.8 + d, 0.8 + d])}
        memorised = 0.9
        kept = 0.3 if paper_like else memorised
        hist[s] = {"sgd": opt(memorised), "ra3": opt(memorised + 0.002 * s), "a3": opt(0.88),
                   "m3": opt(kept), "rm3": opt(kept)}
    return hist


def test_verdicts_on_known_histories():
    good = [r.verdict for r in verdicts(_synthetic(True), 0.5)]
    assert good == ["holds", "holds", "holds", "holds"]
    null = [r.verdict for r in verdicts(_synthetic(False), 0.5)]
    assert null[0] == null[1] == "fails" and null[3] == "fails"  # a null effect is no effect
    one_seed = [r.verdict for r in verdicts(_synthetic(True, seeds=(0,)), 0.5)]
    assert one_seed == ["inconclusive"] * 4
    assert {r.verdict for r in verdicts(_synthetic(True), 0.0)} == {"n/a"}
    hist = _synthetic(True)
    hist[1]["rm3"]["corrupt_fit"] = _curve([np.nan] * 5)
    assert verdicts(hist, 0.5)[1].verdict == "inconclusive"  # a NaN is no evidence
    only_sgd = {s: {"sgd": h["sgd"]} for s, h in _synthetic(True).items()}
    assert {r.verdict for r in verdicts(only_sgd, 0.5)} == {"n/a"}


@pytest.mark.parametrize(("override", "match"), [
    ("optimizers=sgd,adamw", "unknown optimizers"),
    ("noise=2", "noise must be a fraction"),
    ("steps=0", "steps must be >= 1"),
    ("lr=0", "lr > 0"),
    ("seeds=1,1", "distinct"),
    ("init=glorot", "unknown init scheme"),
])
def test_bad_config_names_the_fix(override, match):
    with pytest.raises(ConfigError, match=match):
        parse_overrides(MedianOf3Config, [override])


def test_errors_of_data_and_report(tmp_path):
    cfg = MedianOf3Config(dataset="digits", n_train=5000)
    with pytest.raises(ValueError, match="exceeds the 1437 training"):
        make_trainer(cfg, load_dataset("digits"), "sgd", 0, None)
    from graddyn.train import RunStore

    run = RunStore(tmp_path).create("empty", {"seeds": [0], "optimizers": ["sgd"]}, seed=0,
                                    experiment=NAME)
    with pytest.raises(ValueError, match="run it first"):
        draw_report([run], tmp_path / "out")
