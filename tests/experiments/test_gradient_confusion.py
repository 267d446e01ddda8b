"""Experiment ``gradient-confusion``: both confusion forms against slow float64 references,
the verdict helpers, config errors, and every sub-study end to end on tiny settings."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from graddyn.experiments import ConfigError, config_to_dict, parse_overrides
from graddyn.experiments._confusion_study import (
    ABSENCE_SLOPE,
    MinibatchConfusion,
    cell_summary,
    compare_groups,
    draw_minibatches,
    eval_mode_backward,
    mean_ci_text,
    minibatch_confusion,
    paper_claims,
    per_example_confusion,
    spearman,
    steps_to_target,
    trend,
    trend_verdict,
)
from graddyn.experiments._stats import absence_verdict
from graddyn.experiments.gradient_confusion import (
    GradientConfusionConfig,
    load_data,
    make_cells,
    report_gradient_confusion,
    run_gradient_confusion,
    study_table,
)
from graddyn.instruments._base import Probe
from graddyn.models import build_model
from graddyn.train import RunStore


# ---- references ---------------------------------------------------------------------------
def reference_grads(model, x, y):
    """(B, P) per-example gradients: one torch.autograd.grad per example, float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for b in range(len(y)):
        loss = F.cross_entropy(model(x[b : b + 1]), y[b : b + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def reference_stats(g):
    """min cosine, eta, mean cosine and median over the pairs i < j of the rows of g."""
    inner, cos = [], []
    for i in range(len(g)):
        for j in range(i + 1, len(g)):
            inner.append(float(g[i] @ g[j]))
            cos.append(inner[-1] / float(g[i].norm() * g[j].norm()))
    return {"min_cosine": min(cos), "eta": max(0.0, -min(inner)),
            "mean_cosine": float(np.mean(cos)), "cos_q50": float(np.quantile(cos, 0.5))}


def check(stats, ref):
    for key, value in ref.items():
        assert stats[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def tiny_wrn():
    return build_model("wide-resnet", (1, 8, 8), 3, depth=10, width_factor=1,
                       base_channels=2, batchnorm=True, skip=True, init="kaiming")


# ---- the two forms ------------------------------------------------------------------------
def test_per_example_form_matches_reference_loop():
    model = build_model("mlp", (5,), 3, width=6, depth=2, init="kaiming")
    x, y = torch.randn(7, 5), torch.randint(3, (7,))
    stats = per_example_confusion(model, x, y)
    check(stats, reference_stats(reference_grads(model, x, y)))
    assert stats["num_pairs"] == 21 and stats["cos_hist"].sum() == 21


def test_per_example_form_uses_eval_mode_batch_norm_and_restores_mode():
    model = tiny_wrn()
    x, y = torch.randn(12, 1, 8, 8), torch.randint(3, (12,))
    model.train()
    F.cross_entropy(model(x), y).backward()  # running statistics away from their init
    model.train()
    stats = per_example_confusion(model, x[:5], y[:5])
    assert model.training
    model.eval()
    check(stats, reference_stats(reference_grads(model, x[:5], y[:5])))


def test_eval_mode_backward_restores_eval_mode_too():
    model = tiny_wrn().eval()
    eval_mode_backward(model, lambda o, t: F.cross_entropy(o, t, reduction="none"),
                     torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]))
    assert not model.training


def test_minibatch_form_matches_separate_train_mode_backwards():
    model = tiny_wrn().train()
    x, y = torch.randn(20, 1, 8, 8), torch.randint(3, (20,))
    stats = minibatch_confusion(model, x, y, 3, 4, torch.Generator().manual_seed(5))
    # reference: the same minibatches, each by an ordinary train-mode backward
    idx = torch.randperm(20, generator=torch.Generator().manual_seed(5))[:12].split(4)
    rows = []
    for batch in idx:
        model.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    check(stats, reference_stats(torch.stack(rows)))
    assert stats["num_pairs"] == 3
    model.eval()  # eval-mode gradients differ: the form really used batch statistics
    eval_stats = minibatch_confusion(model, x, y, 3, 4, torch.Generator().manual_seed(5))
    assert eval_stats["min_cosine"] != pytest.approx(stats["min_cosine"])
    # measuring in train mode must not move batch norm's running statistics
    model = tiny_wrn().train()
    buffers = [b.clone() for b in model.buffers()]
    minibatch_confusion(model, x, y, 3, 4, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))


def test_minibatch_form_errors():
    model = build_model("mlp", (5,), 3, width=4, depth=1)
    x, y = torch.randn(10, 5), torch.randint(3, (10,))
    with pytest.raises(ValueError, match="at least 2 minibatch gradients"):
        minibatch_confusion(model, x, y, 1, 4, torch.Generator())
    with pytest.raises(ValueError, match="exceeds the 10 training examples; lower mb_size"):
        draw_minibatches(10, 2, 11, torch.Generator())


def test_draw_minibatches_disjoint_when_possible():
    batches = draw_minibatches(10, 2, 5, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    batches = draw_minibatches(10, 3, 5, torch.Generator().manual_seed(0))  # 15 > 10
    assert [len(set(b.tolist())) for b in batches] == [5, 5, 5]


def test_minibatch_instrument_is_deterministic_per_step_and_checks_use():
    model = build_model("mlp", (5,), 3, width=4, depth=1)
    x, y = torch.randn(30, 5), torch.randint(3, (30,))
    inst = MinibatchConfusion(x, y, count=3, size=4, seed=1)
    with pytest.raises(ValueError, match="compute\\(\\) before update"):
        inst.compute()
    with pytest.raises(ValueError, match="needs probe.model"):
        inst.update(Probe(step=0))
    inst.update(Probe(model=model, step=7))
    first = inst.compute()
    inst.reset()
    inst.update(Probe(model=model, step=7))
    assert inst.compute()["min_cosine"] == first["min_cosine"]
    inst.update(Probe(model=model, step=8))
    assert inst.compute()["min_cosine"] != first["min_cosine"]


# ---- verdict helpers ----------------------------------------------------------------------
def test_spearman_describes_pooled_cells():
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert spearman([1, 2, 3, 4], [1.0, 2.0, float("nan"), 3.0]) == pytest.approx(1.0)


def test_trend_is_a_per_seed_slope_with_an_interval():
    factors = [2, 4, 8, 16]
    rising = np.array([[0.1, 0.2, 0.3, 0.4], [0.12, 0.21, 0.33, 0.41], [0.09, 0.2, 0.29, 0.4]])
    est = trend(factors, rising)
    assert est.mean == pytest.approx(0.1, abs=0.01) and est.n == 3
    assert trend_verdict(est, +1) == "holds" and trend_verdict(est, -1) == "fails"
    # a strong pooled rank correlation from one seed is not a trend over seeds
    assert trend_verdict(trend(factors, rising[:1]), +1) == "inconclusive"
    noise = np.array([[0.1, -0.1, 0.1, -0.1], [-0.1, 0.1, -0.1, 0.1], [0.0, 0.05, -0.05, 0.0]])
    assert trend_verdict(trend(factors, noise), +1) == "inconclusive"
    with pytest.raises(ValueError, match="expected_sign must be \\+1 or -1"):
        trend_verdict(est, 0)
    with_zero = trend([0, 1, 3], np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.1]]))
    assert with_zero.mean == pytest.approx(1.0, abs=0.05)  # log2(1 + depth) when depth 0 is in


def test_absence_of_growth_needs_an_interval_inside_the_margin():
    """The old rule called any rho > -0.5 support, NaN included."""
    factors = [2, 4, 8, 16, 32]
    flat = np.array([[-0.40, -0.40, -0.41, -0.40, -0.40], [-0.41, -0.40, -0.40, -0.41, -0.41],
                     [-0.40, -0.41, -0.40, -0.40, -0.41]])
    assert absence_verdict(trend(factors, flat), ABSENCE_SLOPE) == "holds"
    noisy = flat + np.array([[0.0, 0.2, -0.2, 0.1, 0.3], [0.0, -0.3, 0.2, -0.2, -0.3],
                             [0.0, 0.1, 0.0, 0.3, 0.1]])
    assert absence_verdict(trend(factors, noisy), ABSENCE_SLOPE) == "inconclusive"
    missing = flat.copy()
    missing[1, 3] = np.nan  # a diverged cell: no value
    assert absence_verdict(trend(factors, missing), ABSENCE_SLOPE) == "inconclusive"
    growing = flat - 0.1 * np.log2(factors)
    assert absence_verdict(trend(factors, growing), ABSENCE_SLOPE) == "fails"


def test_compare_groups_and_formatting():
    assert compare_groups([1.0, 1.1, 1.05], [0.0, 0.1, 0.05])[1] == "holds"
    assert compare_groups([0.0, 0.1, 0.05], [1.0, 1.1, 1.05])[1] == "fails"
    assert compare_groups([0.0, 1.0], [0.5, 0.6])[1] == "inconclusive"
    assert compare_groups([1.0, 1.5], [0.0, 0.8])[1] == "inconclusive"  # 2 seeds: too wide
    assert compare_groups([float("nan"), 1.0], [1.0, 2.0])[1] == "inconclusive"
    with pytest.raises(ValueError, match="at least one value on each side"):
        compare_groups([], [1.0])
    assert mean_ci_text([1.0, 3.0]) == "2 ± 13"
    assert mean_ci_text([math.inf]) == "inf (not reached)" and mean_ci_text([2.0, math.inf]) == "2+"
    assert mean_ci_text([float("nan"), 1.0]) == "n/a (1/2 seeds without a value)"
    assert mean_ci_text([float("nan")]) == "n/a" and mean_ci_text([2.0]) == "2 (n=1)"
    assert steps_to_target(np.array([0, 5]), np.array([1.0, 0.2]), 0.3, False) == 5.0
    assert steps_to_target(np.array([0, 5]), np.array([1.0, 0.9]), 0.3, False) == math.inf


def test_matched_confusion_is_taken_where_the_loss_first_reaches_the_target(tmp_path):
    run = RunStore(tmp_path).create("r", {})
    for step, loss, cos in ((0, 2.0, 0.5), (10, 0.5, 0.1), (20, 0.2, -0.3), (30, 0.1, -0.4)):
        metrics = {"train/loss": loss, "train/acc": 1 - loss / 2, "test/acc": 0.5}
        for inst in ("confusion", "mb_confusion"):
            metrics |= {f"{inst}/min_cosine": cos, f"{inst}/eta": -cos,
                        f"{inst}/mean_cosine": cos}
        run.log(step, {f"g/d=1/seed=0/{k}": v for k, v in metrics.items()})
    s = cell_summary(run, "g/d=1/seed=0", target_acc=0.9, target_loss=0.3)
    assert s["pe_min_cosine_matched"] == -0.3 and s["mb_min_cosine_init"] == 0.5
    assert s["pe_min_cosine_avg"] == pytest.approx(-0.025) and s["steps_to_acc"] == 20
    assert math.isnan(cell_summary(run, "g/d=1/seed=0", 0.9, 0.01)["mb_eta_matched"])


def test_paper_claims_unknown_study():
    with pytest.raises(ValueError, match="unknown study 'x'; valid: width, depth"):
        paper_claims("x", {}, 10)


# ---- config -------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["probe_size=1"], "probe_size and mb_count must be >= 2"),
    (["epochs=-1"], "epochs and lr must be > 0 \\(or 0: the study's default\\)"),
    (["lr=-0.1"], "epochs and lr must be > 0"),
    (["batch_size=0"], "batch_size must be >= 1"),
    (["seeds="], "seeds must be non-empty"),
    (["study=depth", "depths=0,-1"], "depths must be non-empty values >= 0"),
    (["study=bn-skip", "wrn_depths=12"], "wide-resnet depths must be 6n\\+4"),
    (["arch=wide-resnet", "depth=4"], "set depth / depths / wrn_depths"),
])
def test_config_errors_name_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_overrides(GradientConfusionConfig, overrides)


def test_config_rejects_unknown_study_and_arch():
    with pytest.raises(ValueError, match="unknown study 'x'"):
        GradientConfusionConfig(study="x")
    with pytest.raises(ValueError, match="unknown arch 'x'; valid: mlp, wide-resnet"):
        GradientConfusionConfig(arch="x")


def test_load_data_needs_enough_examples():
    with pytest.raises(ValueError, match="fewer than batch_size=128 / mb_size=128; lower"):
        load_data(GradientConfusionConfig(max_train=50))


# ---- every sub-study end to end -------------------------------------------------------------
TINY = dict(seeds=(0, 1), epochs=1, batch_size=32, max_train=96, mb_count=3, mb_size=16,
            probe_size=6, evals_per_epoch=1, target_acc=0.2)
STUDIES = {
    "width": dict(widths=(4, 16), depth=1),
    "depth": dict(depths=(0, 2), width=8),
    "bn-skip": dict(wrn_depths=(10,), base_channels=2),
    "init": dict(linear_depths=(1, 3), width=8),
}


def _tiny_run(tmp_path, study):
    cfg = GradientConfusionConfig(study=study, **TINY, **STUDIES[study])
    run = RunStore(tmp_path).create("r", config_to_dict(cfg))
    run_gradient_confusion(cfg, run)
    return cfg, run


@pytest.mark.parametrize("study", list(STUDIES))
def test_study_runs_and_states_claims(tmp_path, study):
    cfg, run = _tiny_run(tmp_path, study)
    for cell in make_cells(cfg):
        steps, _ = run.history(f"{cell.tag}/mb_confusion/min_cosine")
        assert steps.tolist() == [0, 3]  # init and the end of the one epoch
        summary = cell_summary(run, cell.tag, 0.2, 0.3)
        assert -1 <= summary["pe_min_cosine_init"] <= 1 and summary["mb_eta_avg"] >= 0
    table = study_table(cfg, [run])
    assert sum(len(v) for by_f in table.values() for v in by_f.values()) == len(make_cells(cfg))
    rows = paper_claims(study, table, total_steps=3)
    assert {r[1] for r in rows} >= {"per-example, at init", "minibatch, avg over training"}
    assert {r[3] for r in rows} <= {"holds", "fails", "inconclusive"}


# drawing is matplotlib-bound (seconds each); one study in the fast suite, all in `make test-slow`
@pytest.mark.parametrize("study", [
    "width", *(pytest.param(s, marks=pytest.mark.slow) for s in ("depth", "bn-skip", "init"))])
def test_study_report(tmp_path, study):
    _, run = _tiny_run(tmp_path, study)
    paths = report_gradient_confusion([run], tmp_path / "out")
    assert [p.name for p in paths] == [f"{study}_{n}.png" for n in
                                       ("vs_factor", "over_training", "cosine_histograms",
                                        "claims")]
    claims = (tmp_path / "out" / f"{study}_claims.md").read_text()
    assert "| per-example, at init |" in claims and "| minibatch, avg over training |" in claims
    assert "Student-t interval" in claims and "change per doubling" in claims
    grid = (tmp_path / "out" / f"{study}_verdict_grid.md").read_text()
    assert "| claim | per-example, at init |" in grid


def test_bn_skip_cells_cover_the_four_combinations():
    cfg = GradientConfusionConfig(study="bn-skip", seeds=(0,))
    combos = {(c.group, c.options["batchnorm"], c.options["skip"]) for c in make_cells(cfg)}
    assert combos == {("plain", False, False), ("skip", False, True), ("bn", True, False),
                      ("bn+skip", True, True)}


def test_resume_skips_finished_cells_and_divergence_is_recorded(tmp_path):
    cfg = GradientConfusionConfig(study="depth", **{**TINY, **STUDIES["depth"], "seeds": (0,)})
    run = RunStore(tmp_path).create("r", config_to_dict(cfg))
    run_gradient_confusion(cfg, run)
    before = run.latest()
    run_gradient_confusion(cfg, run)  # every cell has its final checkpoint: nothing reruns
    assert run.latest() == before
    bad = GradientConfusionConfig(study="depth", lr=1e300, **{**TINY, **STUDIES["depth"]})
    run = RunStore(tmp_path).create("bad", config_to_dict(bad))
    run_gradient_confusion(bad, run)
    summary = cell_summary(run, make_cells(bad)[-1].tag, 0.99, 0.0)
    assert summary["diverged"] == 1.0 and summary["steps_to_acc"] == math.inf


def test_cell_summary_needs_a_run():
    with pytest.raises(ValueError, match="run the study first"):
        cell_summary(_EmptyRun(), "mlp/depth=1/seed=0", 0.9, 0.3)


class _EmptyRun:
    name = "empty"

    def history(self, name):
        return np.zeros(0, dtype=np.int64), np.zeros(0)


def test_registered_and_runs_through_the_framework(tmp_path):
    from graddyn.experiments import EXPERIMENTS, run_experiment

    exp = EXPERIMENTS.get("gradient-confusion")()
    assert exp.demo_config().study == "depth" and exp.summary().startswith("Gradient confusion")
    overrides = ["study=init", "linear_depths=1,2", "width=4", "seeds=0", "epochs=1",
                 "batch_size=32", "max_train=64", "mb_count=2", "mb_size=16", "probe_size=4"]
    run = run_experiment("gradient-confusion", overrides, root=tmp_path, progress=False)
    assert run.status == "finished"
    assert "orthogonal/depth=2/seed=0/mb_confusion/min_cosine" in run.metric_names()
