"""coherent-gradients.label-noise: a tiny config end to end, what it records, the verdict
logic on synthetic histories, the training-batch rule, and the CLI."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from graddyn.cli import main
from graddyn.data import load_dataset
from graddyn.experiments import EXPERIMENTS, parse_overrides, report, run_experiment
from graddyn.experiments._label_noise_report import (
    FIT_ACC,
    mean_over_steps,
    verdict_markdown,
    verdicts,
)
from graddyn.experiments._seeds import noisy_subset
from graddyn.experiments.label_noise import (
    LabelNoiseConfig,
    level_tag,
)
from graddyn.instruments import BatchCoherence, Coherence, Probe
from graddyn.pergrad import capture

NAME = "coherent-gradients.label-noise"
TINY = ["dataset=digits", "n_train=200", "width=16", "steps=12", "eval_points=3",
        "split_steps=4", "coherence_points=2", "noise_levels=0,0.5,1", "seeds=0,1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return root, run_experiment(NAME, TINY, root=root, progress=False)


def test_registered_as_demo():
    from graddyn.cli import DEMO_EXPERIMENT

    assert DEMO_EXPERIMENT == NAME and NAME in EXPERIMENTS
    demo, default = EXPERIMENTS.get(NAME)().demo_config(), LabelNoiseConfig()
    assert len(demo.seeds) >= 3  # the demo's verdicts come from at least 3 seeds
    assert (default.preprocess, default.init, default.lr, default.batch_size, default.width) == \
        ("scale", "xavier-sqrt2", 0.1, 100, 2048)
    assert default.total_steps == 4000  # 100 epochs of the 4,000-image subset


def test_tiny_run_reports_figures_and_verdict(tiny):
    root, run = tiny
    assert run.status == "finished"
    html = report(run.name, root=root)
    out = html.parent
    for name in ("train-acc", "test-acc", "train-loss", "learned", "split", "per-example",
                 "coherence", "verdict"):
        assert (out / f"label-noise-{name}.png").stat().st_size > 0
    data = json.loads((out / "verdict.json").read_text())
    assert [r["prediction"][:4] for r in data["rows"]] == ["(1) ", "(2) ", "(2b)", "(3) ",
                                                          "(4) "]
    assert all(r["verdict"] in ("holds", "fails", "inconclusive") for r in data["rows"])
    assert data["parameters"]["seeds"] == "0,1" and data["parameters"]["preprocess"] == "scale"
    md = (out / "verdict.md").read_text()
    assert "| (1) more noise" in md and "Student-t interval" in md
    assert "| 50 % |" in (out / "levels.md").read_text()


def test_records_every_quantity_per_level(tiny):
    _, run = tiny
    names = set(run.metric_names())
    for frac, seed in ((0.0, 0), (0.5, 1), (1.0, 0)):
        tag = level_tag(frac, seed)
        for m in ("fit/train_acc", "fit/test_acc", "fit/train_loss", "train/batch_loss",
                  "learned_at/frac_learned_pristine", "group_split/f_p",
                  "group_split/null2/f_c", "group_split/mean_p", "batch_coherence/alpha"):
            assert f"{tag}/{m}" in names, f"{tag}/{m}"
    steps, _ = run.history("seed1/noise50/group_split/f_p")
    assert steps.tolist() == [1, 2, 3, 4]  # every step of the split window
    a, b = run.history("seed0/noise50/fit/train_loss")[1], run.history("seed1/noise50/fit/"
                                                                        "train_loss")[1]
    assert not np.array_equal(a, b)  # seeds are replicates, not copies


def test_f_p_plus_f_c_is_one(tiny):
    _, run = tiny
    for prefix in ("seed0/noise50/group_split/", "seed0/noise50/group_split/null0/"):
        _, fp = run.history(prefix + "f_p")
        _, fc = run.history(prefix + "f_c")
        np.testing.assert_allclose(fp + fc, 1.0, atol=1e-12)
    _, fc0 = run.history("seed0/noise0/group_split/f_c")
    np.testing.assert_allclose(fc0, 0.0)  # no corrupt examples at 0 %


def test_recorded_corrupt_mask_matches_data(tiny):
    _, run = tiny
    cfg = parse_overrides(LabelNoiseConfig, TINY)
    splits = load_dataset("digits", standardize=False)
    for frac in cfg.noise_levels:
        data, mask = noisy_subset(splits, cfg.n_train, frac, seed=1)
        saved = run.load_array(f"{level_tag(frac, 1)}/corrupt_mask")
        np.testing.assert_array_equal(saved, mask.numpy())
        np.testing.assert_array_equal(run.load_array(f"{level_tag(frac, 1)}/train_labels"),
                                      data.train_y.numpy())
        assert int(mask.sum()) == round(frac * cfg.n_train)
        assert torch.equal(data.train_y[~mask], data.clean_y[~mask])  # pristine untouched
        assert torch.equal(data.train_y.sort().values, data.clean_y.sort().values)


def _curve(values, steps=None):
    values = np.asarray(values, float)
    return (np.arange(len(values)) if steps is None else np.asarray(steps)), values


def _synthetic(good: bool, seeds=(0, 1, 2), jitter: float = 0.01) -> dict:
    """Histories of three levels for each seed; ``good`` follows the paper, else noise does
    not matter at all (a null effect: every level identical). ``jitter`` adds seed noise."""
    hist = {}
    for s in seeds:
        rng = np.random.default_rng(s)
        levels = {}
        for f in (0.0, 0.5, 1.0):
            speed = (1.0 - 0.5 * f) if good else 1.0
            acc = np.minimum(1.0, speed * np.linspace(0.2, 2.5, 6) + jitter * rng.random())
            pristine = np.minimum(1.0, np.linspace(0.2, 2.5, 6)) if good else acc
            corrupt = np.linspace(0.0, 1.0, 6) if good else acc
            nan = np.full(6, np.nan)
            test = 0.9 - 0.7 * f * good + jitter * rng.random()
            levels[f] = {
                "fit/train_acc": _curve(acc), "fit/test_acc": _curve([test] * 6),
                "learned_at/frac_learned": _curve(pristine if good else acc),
                "learned_at/frac_learned_pristine": _curve(pristine if f < 1 else nan),
                "learned_at/frac_learned_corrupt": _curve(corrupt if f > 0 else nan),
                "group_split/f_p": _curve([0.8 if good else 0.5] * 3),
                "group_split/null0/f_p": _curve([0.5 - jitter * rng.random()] * 3),
            }
        hist[s] = levels
    return hist


def _words(rows):
    return [r.verdict for r in rows]


def test_verdicts_hold_on_paper_like_histories():
    rows = verdicts(_synthetic(good=True))
    assert _words(rows) == ["holds"] * 5
    assert str(FIT_ACC) in verdict_markdown(rows)


def test_a_null_effect_fails_when_exact_and_is_inconclusive_when_noisy():
    exact = verdicts(_synthetic(good=False, jitter=0.0))  # every level identical: a tie
    assert _words(exact)[:2] == ["fails", "fails"] and exact[4].verdict == "fails"
    noisy = verdicts(_synthetic(good=False, jitter=0.05))
    assert noisy[0].verdict == "inconclusive"  # seed noise only: neither way


def test_one_seed_or_a_nan_never_holds():
    one = verdicts(_synthetic(good=True, seeds=(0,)))
    assert set(_words(one)) == {"inconclusive"}
    hist = _synthetic(good=True)
    hist[1][0.5]["learned_at/frac_learned_corrupt"] = _curve(np.full(6, np.nan))
    assert verdicts(hist)[1].verdict == "inconclusive"


def test_a_seed_with_a_transient_collapse_at_the_end_still_fits():
    hist = _synthetic(good=True)
    s, v = hist[2][0.5]["fit/train_acc"]  # at 1.0 (its last three evaluations)
    hist[2][0.5]["fit/train_acc"] = (s, np.concatenate([v[:-1], [0.3]]))
    assert verdicts(hist)[3].verdict == "holds"  # the end is the median of the last three


def test_verdict_needs_mixed_level():
    hist = {s: {k: v for k, v in h.items() if k in (0.0, 1.0)}
            for s, h in _synthetic(good=True).items()}
    rows = verdicts(hist)
    assert rows[1].verdict == "n/a" and rows[2].verdict == "n/a" and rows[4].verdict == "n/a"


def test_mean_over_steps_weights_by_step():
    assert mean_over_steps(_curve([0.0, 1.0, 1.0], steps=[0, 1, 11])) == pytest.approx(
        (0.5 + 10) / 11)


def test_demo_runs_label_noise_and_reports(tmp_path, monkeypatch, capsys):
    from graddyn.experiments.label_noise import LabelNoise

    monkeypatch.setattr(LabelNoise, "demo_config",
                        lambda self: parse_overrides(LabelNoiseConfig, TINY))
    assert main(["demo", "--root", str(tmp_path), "--quiet"]) == 0
    out = tmp_path / f"demo-{NAME}" / "report"
    printed = capsys.readouterr().out
    assert "demo report:" in printed and "demo-sized run, differs from the study's default" \
        in printed and "steps 12 (default 0)" in printed and "seeds" in printed
    page = (out / "report.html").read_text()
    assert "<h2>Verdicts</h2>" in page and "label-noise-verdict.png" not in page  # HTML


def test_cli_run_good_and_bad(tmp_path, capsys):
    args = ["run", NAME, "--root", str(tmp_path), "--quiet", "--set", *TINY,
            "noise_levels=0.5", "steps=4"]
    assert main(args) == 0
    assert "finished" in capsys.readouterr().out
    assert main(["run", NAME, "--root", str(tmp_path), "--set", "bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'bogus'" in err and "noise_levels" in err and "split_steps" in err
    assert main(["run", NAME, "--root", str(tmp_path), "--set", "noise_levels=0,1.5"]) == 2
    assert "noise_levels must be fractions" in capsys.readouterr().err
    assert main(["run", NAME, "--root", str(tmp_path), "--set", "width=wide"]) == 2
    assert "bad value for width" in capsys.readouterr().err


def test_minibatch_coherence_equals_streaming_coherence_on_one_batch():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x, y = torch.randn(10, 4), torch.randint(3, (10,))
    with capture(model) as cap:
        losses = F.cross_entropy(model(x), y, reduction="none")
    probe = Probe(grads=cap.backward(losses), losses=losses.detach(), targets=y)
    fast, ref = BatchCoherence(), Coherence(within=False)
    fast.update(probe)
    ref.update(probe)
    for key in ("alpha", "alpha_plugin", "m_coherence"):
        assert fast.compute()[key] == pytest.approx(ref.compute()[key], rel=1e-10)


def test_resume_after_a_crash_continues_the_cumulative_split(tmp_path, monkeypatch):
    """A run that dies mid split-window and is resumed records what an uninterrupted run
    records (the cumulative f_p state and the step counter live in the checkpoint)."""
    cfg = [*TINY, "noise_levels=0.5", "split_steps=10", "seeds=3"]  # checkpoints every 3 steps
    whole = run_experiment(NAME, cfg, root=tmp_path / "a", progress=False)
    import graddyn.train._measured as measured_module  # MeasuredMean calls it from there

    real_call, calls = measured_module.measured_backward, []

    def crash_at_step_8(*args, **kwargs):  # the split window measures steps 1..10
        calls.append(1)
        if len(calls) == 8:
            raise RuntimeError("killed")
        return real_call(*args, **kwargs)

    monkeypatch.setattr(measured_module, "measured_backward", crash_at_step_8)
    with pytest.raises(RuntimeError, match="killed"):
        run_experiment(NAME, cfg, root=tmp_path / "b", progress=False)
    monkeypatch.setattr(measured_module, "measured_backward", real_call)
    resumed = run_experiment(NAME, cfg, root=tmp_path / "b", resume=True, progress=False)
    for name in ("seed3/noise50/group_split/f_p", "seed3/noise50/group_split/null1/mean_c",
                 "seed3/noise50/fit/train_acc", "seed3/noise50/learned_at/mean_step_pristine"):
        s1, v1 = whole.history(name)
        s2, v2 = resumed.history(name)
        np.testing.assert_array_equal(s1, s2)
        np.testing.assert_array_equal(v1, v2)  # bit for bit, the measurement window included


@pytest.mark.parametrize("kw, msg", [
    ({"noise_levels": ()}, "noise_levels must be fractions"),
    ({"width": 0}, "width must be >= 1"),
    ({"split_steps": -1}, "split_steps must be >= 0"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"seeds": ()}, "seeds must be a non-empty list"),
    ({"seeds": (1, 1)}, "seeds must be distinct"),
    ({"init": "glorot"}, "unknown init scheme"),
])
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        LabelNoiseConfig(**kw)


def test_helpers_raise_with_the_fix():
    from graddyn.experiments.label_noise import Fit

    with pytest.raises(ValueError, match="exceeds the"):
        noisy_subset(load_dataset("digits"), 10_000, 0.5, seed=0)
    with pytest.raises(RuntimeError, match="before any update"):
        Fit().compute()
    with pytest.raises(ValueError, match="Fit needs"):
        Fit().update(Probe())
    with pytest.raises(ValueError, match="needs per-example gradients"):
        BatchCoherence().update(Probe())
    with pytest.raises(RuntimeError, match="before any update"):
        BatchCoherence().compute()


def test_report_of_a_run_without_metrics_says_so(tmp_path):
    from graddyn.experiments._label_noise_report import draw_report
    from graddyn.train import RunStore

    run = RunStore(tmp_path).create("empty", {"noise_levels": [0.5]}, seed=0, experiment=NAME)
    with pytest.raises(ValueError, match="run the experiment first"):
        draw_report([run], tmp_path / "out")
