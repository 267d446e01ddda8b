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
    noisy_split,
)
from graddyn.train import Trainer, at_end, every

NAME = "coherent-gradients.winsorize"
TINY = ["dataset=digits", "n_train=100", "width=8", "depth=1", "steps=6", "batch_size=20",
        "eval_points=3", "noise=0.5"]


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
    assert DEMO.c > 0


def test_tiny_sweep_reports_grid_table_and_verdicts(sweep):
    root, result = sweep
    assert len(result.runs) == 2 and not result.failed
    out = report(result.name, root=root).parent
    for name in ("grid", "overfit", "summary", "verdict"):
        assert (out / f"winsorize-{name}.png").stat().st_size > 0
    table = (out / "summary.md").read_text().splitlines()
    assert table[0].startswith("| noise | c | proper_acc") and len(table) == 4  # 2 points
    rows = json.loads((out / "verdict.json").read_text())
    assert [r["prediction"][:3] for r in rows] == ["(1)", "(2)", "(3)"]


def test_records_overfit_and_memorisation(sweep):
    root, result = sweep
    from graddyn.train import RunStore

    run = RunStore(root).open(result.runs[1])  # c = 1
    steps, over = run.history("overfit")
    s_tr, train = run.history("train/acc")
    _, test = run.history("test/acc")
    assert steps.tolist() == s_tr.tolist() == [0, 2, 4, 6]
    np.testing.assert_allclose(over, overfit_measure(train, test, 0.5, 10))
    assert "learned_at/frac_learned_corrupt" in run.metric_names()
    assert int(run.load_array("corrupt_mask").sum()) == 50
    # learned-at steps date from when each example was first learned for good, not from the
    # evaluation reading them (the tracker lives across evaluations)
    s_lp, mean_step = run.history("learned_at/mean_step_pristine")
    assert (mean_step <= s_lp).all() and (mean_step[1:] < s_lp[1:]).any()


def test_c0_equals_plain_mean_loss_rule(tmp_path):
    run = run_experiment(NAME, [*TINY, "c=0"], root=tmp_path, progress=False)
    cfg = parse_overrides(WinsorizeConfig, TINY)
    splits = load_dataset("digits")
    data, _ = noisy_split(cfg, splits)
    model = build_network(cfg, splits).to(data.train_x.dtype)
    import torch

    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=cfg.lr), data,
                      batch_size=cfg.batch_size, seed=cfg.seed, progress=False,
                      eval_schedule=every(2) | at_end)  # default rule: mean-loss backward
    trainer.fit(cfg.total_steps)
    for name in ("train/batch_loss", "train/acc", "test/acc", "test/loss"):
        plain = [v for _, n, v in sorted(trainer.history) if n == name]
        np.testing.assert_array_equal(run.history(name)[1], plain, err_msg=name)


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


def _synthetic(paper_like: bool, plain_memorises: bool = True) -> dict:
    """(noise, c) in {0, 0.5} x {0, 4}. ``paper_like``: c = 4 stays below the proper
    accuracy, overfits less, and its accuracy peaks then falls; else c = 4 memorises like
    c = 0 and its accuracy only rises."""
    rise = np.linspace(0.1, 1.0, 6)
    plain_top = 1.0 if plain_memorises else 0.5
    hist = {}
    for eps in (0.0, 0.5):
        hist[(eps, 0)] = {"train_acc": _curve(np.minimum(rise, plain_top)),
                          "test_acc": _curve(np.minimum(rise, 0.85))}
        if paper_like:
            top = proper_accuracy(eps) - 0.05
            train = np.array([0.1, 0.3, top, top, top - 0.1, top - 0.1])
            test = (train - eps / 10) / (1 - eps)  # overfit exactly 0
            hist[(eps, 4)] = {"train_acc": _curve(train), "test_acc": _curve(test)}
        else:
            hist[(eps, 4)] = {"train_acc": _curve(rise), "test_acc": _curve(rise * 0.6)}
    return hist


def test_verdicts_hold_on_paper_like_histories():
    rows = verdicts(_synthetic(paper_like=True))
    assert [r.holds for r in rows] == [True, True, True], verdict_markdown(rows)
    assert "proper 0.550" in rows[0].evidence and "plain SGD (c=0) peaks" in rows[0].evidence


def test_verdicts_fail_on_contrary_histories():
    rows = verdicts(_synthetic(paper_like=False))
    assert [r.holds for r in rows] == [False, False, False], verdict_markdown(rows)
    assert "| fails |" in verdict_markdown(rows)


def test_proper_accuracy_verdict_needs_the_control_to_memorise():
    rows = verdicts(_synthetic(paper_like=True, plain_memorises=False))
    assert rows[0].holds is None  # plain SGD never exceeded it either: too short to tell


def test_verdicts_not_testable_without_the_points():
    hist = {(0.0, 0): _synthetic(True)[(0.0, 0)]}
    assert [r.holds for r in verdicts(hist)] == [None, None, None]


def test_peak_drop_threshold_is_applied():
    hist = _synthetic(paper_like=True)
    steps, train = hist[(0.5, 4)]["train_acc"]
    hist[(0.5, 4)]["train_acc"] = (steps, np.r_[train[:-1], train.max() - PEAK_DROP / 2])
    assert verdicts(hist)[2].holds is False


def test_summary_rows():
    rows = summary_rows(_synthetic(paper_like=True))
    assert [(r["noise"], r["c"]) for r in rows] == [(0.0, 0), (0.0, 4), (0.5, 0), (0.5, 4)]
    r = rows[2]  # noise 0.5, c = 0: train 1.0, test 0.85 at the end
    assert r["overfit"] == pytest.approx(1.0 - (0.05 + 0.5 * 0.85))
    assert r["peak_train_acc"] == 1.0 and r["steps"] == 50 and np.isnan(r["corrupt_fit"])


@pytest.mark.parametrize("override, match", [
    ("c=50", "c < B/2"),  # >= B/2 for the default batch of 100
    ("c=-1", "c must be >= 0"),
    ("noise=1.5", "noise must be a fraction"),
    ("n_train=50", "smaller than batch_size"),
    ("lr=0", "must be > 0"),
    ("eval_points=0", "eval_points must be >= 1"),
    ("steps=-1", "steps must be >= 0"),
    ("model=resnet", "expected one of mlp, cnn"),
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
        noisy_split(cfg, load_dataset("digits"))


def test_report_errors(sweep, tmp_path):
    root, result = sweep
    from graddyn.train import RunStore

    runs = [RunStore(root).open(n) for n in result.runs]
    with pytest.raises(ValueError, match="report them separately"):
        collect([runs[0], runs[0]])
    with pytest.raises(ValueError, match="run the experiment or sweep first"):
        draw_report([], tmp_path)
