"""coherent-gradients.winsorize: a tiny sweep end to end with its report, c = 0 against the
plain mean-loss rule, the overfit measure, the verdict logic on synthetic histories, and
config validation (every raise of the experiment and its report)."""

import json

import numpy as np
import pytest

from graddyn.data import load_dataset
from graddyn.experiments import (
    EXPERIMENTS,
    ConfigError,
    parse_overrides,
    report,
    run_experiment,
    run_sweep,
)
from graddyn.experiments._seeds import noisy_subset
from graddyn.experiments._winsorize_report import (
    PEAK_DROP,
    collect,
    draw_report,
    overfit_measure,
    proper_accuracy,
    summary_rows,
    verdict_markdown,
    verdicts,
)
from graddyn.experiments.winsorize import (
    DEMO,
    PAPER_STEPS,
    SUBSET_STEPS,
    SUBSET_TRAIN,
    WinsorizeConfig,
    build_network,
)
from graddyn.train import Recording, Trainer, at_end, every

NAME = "coherent-gradients.winsorize"
TINY = ["dataset=digits", "n_train=100", "width=8", "depth=1", "steps=6", "batch_size=20",
        "eval_points=3", "noise=0.5", "seeds=0,1"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return root, run_sweep(NAME, ["c=0,1"], base=TINY, root=root)


def test_registered_with_paper_defaults():
    assert NAME in EXPERIMENTS
    cfg = WinsorizeConfig()
    assert (cfg.model, cfg.width, cfg.depth, cfg.lr, cfg.batch_size) == ("mlp", 256, 3, 0.1, 100)
    assert (cfg.total_steps, cfg.train_size) == (SUBSET_STEPS, SUBSET_TRAIN)
    mnist = WinsorizeConfig(dataset="mnist")
    assert (mnist.total_steps, mnist.train_size) == (PAPER_STEPS, 0)  # 0: all 60,000
    assert DEMO.c > 0 and len(DEMO.seeds) >= 3 and cfg.preprocess == "scale"


def test_tiny_sweep_reports_grid_table_and_verdicts(sweep):
    root, result = sweep
    assert len(result.runs) == 2 and not result.failed
    out = report(result.name, root=root).parent
    for name in ("grid", "overfit", "summary", "verdict"):
        assert (out / f"winsorize-{name}.png").stat().st_size > 0
    table = (out / "summary.md").read_text().splitlines()
    assert table[0].startswith("| noise | c | proper_acc") and len(table) == 4  # 2 points
    data = json.loads((out / "verdict.json").read_text())
    assert [r["prediction"][:3] for r in data["rows"]] == ["(1)", "(2)", "(3)"]
    assert data["parameters"]["seeds"] == "0,1" and "Student-t" in data["rule"]
    assert "±" in table[2]  # intervals over the two seeds


def test_records_overfit_and_memorisation(sweep):
    root, result = sweep
    from graddyn.train import RunStore

    run = RunStore(root).open(result.runs[1])  # c = 1
    for seed in (0, 1):
        steps, over = run.history(f"seed{seed}/overfit")
        s_tr, train = run.history(f"seed{seed}/train/acc")
        _, test = run.history(f"seed{seed}/test/acc")
        assert steps.tolist() == s_tr.tolist() == [0, 2, 4, 6]
        np.testing.assert_allclose(over, overfit_measure(train, test, 0.5, 10))
        assert f"seed{seed}/learned_at/frac_learned_corrupt" in run.metric_names()
        assert int(run.load_array(f"seed{seed}/corrupt_mask").sum()) == 50
        # learned-at steps date from when each example was first learned for good, not from
        # the evaluation reading them (the tracker lives across evaluations)
        s_lp, mean_step = run.history(f"seed{seed}/learned_at/mean_step_pristine")
        assert (mean_step <= s_lp).all() and (mean_step[1:] < s_lp[1:]).any()
    assert not np.array_equal(run.load_array("seed0/corrupt_mask"),
                              run.load_array("seed1/corrupt_mask"))


def test_c0_equals_plain_mean_loss_rule(tmp_path):
    run = run_experiment(NAME, [*TINY, "c=0", "seeds=4"], root=tmp_path, progress=False)
    cfg = parse_overrides(WinsorizeConfig, TINY)
    splits = load_dataset("digits", standardize=False)
    data, _ = noisy_subset(splits, cfg.train_size, cfg.noise, seed=4)
    model = build_network(cfg, splits, seed=4).to(data.train_x.dtype)
    import torch

    trainer = Trainer(  # the default gradient step: mean-loss backward
        model, torch.optim.SGD(model.parameters(), lr=cfg.lr), data, batch_size=cfg.batch_size,
        seed=4, progress=False, recording=Recording(eval=every(2) | at_end))
    trainer.fit(cfg.total_steps)
    for name in ("train/batch_loss", "train/acc", "test/acc", "test/loss"):
        plain = [v for _, n, v in sorted(trainer.history) if n == name]
        np.testing.assert_array_equal(run.history(f"seed4/{name}")[1], plain, err_msg=name)


def test_runs_on_mnist1d_and_cnn_needs_images(tmp_path):
    run = run_experiment(NAME, ["dataset=mnist1d", "n_train=200", "steps=4", "eval_points=2",
                                "width=16", "depth=1", "seeds=0", "c=1"], root=tmp_path,
                         progress=False)
    assert len(run.history("seed0/train/acc")[0]) == 3
    cfg = WinsorizeConfig(dataset="mnist1d", model="cnn")
    with pytest.raises(ValueError, match="model=cnn needs images"):
        build_network(cfg, load_dataset("mnist1d"), seed=0)


def test_overfit_measure_and_proper_accuracy():
    assert overfit_measure(1.0, 0.9, 0.5) == pytest.approx(0.5)  # 1 - (0.05 + 0.45)
    assert overfit_measure(0.95, 0.9, 0.0) == pytest.approx(0.05)  # plain generalisation gap
    assert overfit_measure(1.0, 0.3, 1.0) == pytest.approx(0.9)  # all memorised
    np.testing.assert_allclose(overfit_measure([0.6, 1.0], [0.8, 0.8], 0.5, num_classes=2),
                               [-0.05, 0.35])
    assert proper_accuracy(0.5) == pytest.approx(0.55)
    assert proper_accuracy(0.5, num_classes=2) == pytest.approx(0.75)
    # a model at exactly the proper accuracy that tests perfectly does not overfit
    assert overfit_measure(proper_accuracy(0.25), 1.0, 0.25) == pytest.approx(0.0)


def _curve(values):
    values = np.asarray(values, float)
    return np.arange(len(values)) * 10, values


def _synthetic(paper_like: bool, plain_memorises: bool = True, seeds=(0, 1, 2),
               jitter: float = 0.01) -> dict:
    """(noise, c) in {0, 0.5} x {0, 4}, each seed shifted by up to ``jitter``.
    ``paper_like``: c = 4 stays below the proper accuracy, overfits less, and its accuracy
    peaks then falls; else c = 4 memorises exactly like c = 0 (no effect of c at all)."""
    rise = np.linspace(0.1, 1.0, 8)
    plain_top = 1.0 if plain_memorises else 0.5
    hist = {}
    for eps in (0.0, 0.5):
        for c in (0, 4):
            hist[(eps, c)] = {}
            for s in seeds:
                d = jitter * np.random.default_rng(s).random()
                train, test = np.minimum(rise, plain_top) - d, np.minimum(rise, 0.85)
                if c == 4 and paper_like:
                    top = proper_accuracy(eps) - 0.05
                    train = np.array([0.1, 0.3, top, top, top, top - 0.1, top - 0.1,
                                      top - 0.1]) - d
                    test = (train - eps / 10) / (1 - eps)  # overfit exactly 0
                hist[(eps, c)][s] = {"train_acc": _curve(train), "test_acc": _curve(test)}
    return hist


def _words(rows):
    return [r.verdict for r in rows]


def test_verdicts_hold_on_paper_like_histories():
    rows = verdicts(_synthetic(paper_like=True))
    assert _words(rows) == ["holds", "holds", "holds"], verdict_markdown(rows)
    assert "plain SGD 50 %/c=0" in rows[0].evidence


def test_a_null_effect_of_c_does_not_hold():
    """c changes nothing (the old rule passed prediction 2 when overfit was flat)."""
    rows = verdicts(_synthetic(paper_like=False))
    assert _words(rows) == ["fails", "fails", "fails"], verdict_markdown(rows)
    noisy = verdicts(_synthetic(paper_like=False, jitter=0.05))
    assert noisy[1].verdict in ("fails", "inconclusive")


def test_proper_accuracy_verdict_needs_the_control_to_memorise():
    rows = verdicts(_synthetic(paper_like=True, plain_memorises=False))
    assert rows[0].verdict == "inconclusive" and "too short to tell" in rows[0].evidence


def test_verdicts_not_testable_without_the_points():
    hist = {(0.0, 0): _synthetic(True)[(0.0, 0)]}
    assert _words(verdicts(hist)) == ["n/a", "n/a", "n/a"]


def test_one_seed_is_inconclusive():
    rows = verdicts(_synthetic(paper_like=True, seeds=(0,)))
    assert _words(rows) == ["inconclusive"] * 3


def test_a_transient_collapse_at_the_end_is_not_a_fall():
    """The old rule compared the peak with the last evaluation only."""
    hist = _synthetic(paper_like=False)
    for h in hist[(0.5, 4)].values():
        steps, train = h["train_acc"]
        h["train_acc"] = (steps, np.r_[train[:-1], 0.3])  # one collapsed evaluation
    assert verdicts(hist)[2].verdict == "fails"


def test_peak_drop_threshold_is_applied():
    hist = _synthetic(paper_like=True)
    for h in hist[(0.5, 4)].values():
        steps, train = h["train_acc"]
        top = train.max()
        h["train_acc"] = (steps, np.r_[train[:5], [top - PEAK_DROP / 2] * 3])
    assert verdicts(hist)[2].verdict == "fails"


def test_summary_rows():
    rows = summary_rows(_synthetic(paper_like=True, jitter=0.0))
    assert [(r["noise"], r["c"]) for r in rows] == [(0.0, 0), (0.0, 4), (0.5, 0), (0.5, 4)]
    r = rows[2]  # noise 0.5, c = 0: the end is the median of the last three evaluations
    train = np.linspace(0.1, 1.0, 8)[6]  # the median of the last three overfit values
    assert r["overfit"].mean == pytest.approx(train - (0.05 + 0.5 * 0.85))
    assert r["peak_train_acc"].mean == pytest.approx(train) and r["seeds"] == 3
    assert np.isnan(r["corrupt_fit"].mean)


@pytest.mark.parametrize("override, match", [
    ("c=50", "c < B/2"),  # >= B/2 for the default batch of 100
    ("c=-1", "c must be >= 0"),
    ("noise=1.5", "noise must be a fraction"),
    ("n_train=50", "smaller than batch_size"),
    ("lr=0", "must be > 0"),
    ("eval_points=0", "eval_points must be >= 1"),
    ("steps=-1", "steps must be >= 0"),
    ("model=resnet", "expected one of mlp, cnn"),
    ("seeds=1,1", "seeds must be distinct"),
    ("preprocess=whiten", "expected one of scale, standardize"),
])
def test_bad_config_rejected_with_the_fix(override, match):
    with pytest.raises(ConfigError, match=match):
        parse_overrides(WinsorizeConfig, [override])


def test_c_checked_against_the_batch_size():
    with pytest.raises(ConfigError, match="at most 9"):
        parse_overrides(WinsorizeConfig, ["batch_size=20", "c=10"])
    parse_overrides(WinsorizeConfig, ["batch_size=20", "c=9"])  # largest valid


def test_bad_c_in_a_sweep_fails_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="c < B/2"):
        run_sweep(NAME, ["c=0,50"], base=TINY[:-1], root=tmp_path)
    assert not any(tmp_path.iterdir())


def test_n_train_larger_than_the_dataset():
    cfg = WinsorizeConfig(dataset="digits", n_train=5000)
    with pytest.raises(ValueError, match="exceeds the 1437 training examples"):
        noisy_subset(load_dataset("digits"), cfg.train_size, cfg.noise, seed=0)


def test_report_errors(sweep, tmp_path):
    root, result = sweep
    from graddyn.train import RunStore

    runs = [RunStore(root).open(n) for n in result.runs]
    with pytest.raises(ValueError, match="report them separately"):
        collect([runs[0], runs[0]])
    with pytest.raises(ValueError, match="run the experiment or sweep first"):
        draw_report([], tmp_path)
