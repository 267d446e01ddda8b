"""Experiment ``optimum-shifting``: a tiny config runs, resumes and reports in seconds."""

import pytest

from graddyn.experiments import EXPERIMENTS, config_to_dict
from graddyn.experiments._optimum_shifting_report import report_optimum_shifting
from graddyn.experiments.optimum_shifting import (
    METHODS,
    OptimumShiftingConfig,
    prepare_data,
    run_optimum_shifting,
)
from graddyn.train import RunStore, set_progress

TINY = OptimumShiftingConfig(models=("cnn", "resnet"), width=2, cnn_channels=(2, 4),
                             cnn_hidden=24, seeds=(0, 1), steps=4, eig_tol=0.1,
                             batch_size=16, weight_decays=(0.0, 1e-3), sos_every=2, sos_batch=8,
                             os_rows=16, curv_rows=16, trace_probes=2, last_probes=2,
                             eval_every=2, curv_every=2, subset=80)


def test_tiny_run_resume_and_report(tmp_path):
    set_progress(False)
    run = RunStore(tmp_path).create("tiny", config_to_dict(TINY))
    run_optimum_shifting(TINY, run)
    for model in TINY.models:
        assert run.history(f"{model}/tune/best_wd")[1][-1] in TINY.weight_decays
        for method in METHODS:
            for s in (0, 1):
                tag = f"{model}/{method}/s{s}"
                # OS on 16 rows of a wider feature space keeps outputs, never grows |V|_F
                assert run.history(f"{tag}/os/max_rel_change")[1][-1] < 1e-6
                assert (run.history(f"{tag}/os/v_norm")[1][-1]
                        <= run.history(f"{tag}/end/v_norm")[1][-1] + 1e-9)
                assert run.history(f"{tag}/curv/trace")[0].tolist() == [0, 2, 4]
                # ReLU CNN and eval-mode ResNet are piecewise linear: the trace is exact
                assert run.history(f"{tag}/curv/trace_exact")[1].tolist() == [1.0] * 3
                assert run.history(f"{tag}/curv/trace_se")[1].tolist() == [0.0] * 3
                assert run.history(f"{tag}/test/acc")[0].tolist() == [0, 2, 4]
    assert run.history("cnn/sos/s0/sos/max_rel_change")[1][-1] < 1e-6
    before = dict(zip(run.metric_names(), [run.history(n)[1][-1] for n in run.metric_names()]))
    run_optimum_shifting(TINY, run)  # finished pairs are skipped: nothing changes
    assert all(run.history(n)[1][-1] == v for n, v in before.items())
    paths = report_optimum_shifting([run], tmp_path / "out")
    assert [p.name for p in paths] == ["tiny-training.png", "tiny-before-after.png",
                                       "tiny-summary.md"]
    text = paths[-1].read_text()
    assert "## Verdict" in text and "SOS during training gives a lower Hessian trace than SGD "\
        "+ tuned WD" in text and "± " in text and "Student-t interval" in text
    assert (tmp_path / "out" / "tiny-verdict.md").read_text().count("| cnn: ") == 9


def test_verdicts_on_known_values(monkeypatch):
    import numpy as np

    from graddyn.experiments import _optimum_shifting_report as rep

    values = {("sgd", "end", "trace"): [2.0, 2.1, 1.9], ("sgd", "os", "trace"): [2.0, 2.1, 1.9],
              ("sos", "end", "trace"): [40.0, 45.0, 38.0], ("sos", "end", "test/acc"):
              [0.95, 0.96, np.nan]}

    def fake(run, model, method, stage, metric):
        if metric == "max_rel_change":
            return np.array([1e-6, 2e-6, 1e-6])
        return np.array(values.get((method, stage, metric), [1.0, 1.1, 0.9]))

    monkeypatch.setattr(rep, "final", fake)
    rows = {r.prediction.split(": ", 1)[1]: r.verdict for r in rep._model_verdicts(None, "m")}
    assert rows["post hoc OS keeps the outputs on the batch"] == "holds"
    assert rows["post hoc OS lowers the Hessian trace (SGD model)"] == "fails"  # a tie
    assert rows["SOS during training gives a lower Hessian trace than SGD"] == "fails"
    assert rows["SOS during training gives a higher test accuracy than SGD"] == "inconclusive"


def test_validation_split_is_held_out_of_training():
    fit, tune = prepare_data(TINY)
    assert len(tune.test_y) + len(fit.train_y) == 80 and len(fit.test_y) == 80
    assert fit.train_x.data_ptr() == fit.train_x.data_ptr()
    assert not set(map(tuple, tune.test_x.flatten(1)[:20].tolist())) & set(
        map(tuple, fit.train_x.flatten(1).tolist()))


def test_registered_with_a_short_demo():
    exp = EXPERIMENTS.get("optimum-shifting")()
    assert exp.demo_config().steps < OptimumShiftingConfig().steps


def test_report_needs_records(tmp_path):
    run = RunStore(tmp_path).create("empty", config_to_dict(TINY))
    with pytest.raises(ValueError, match="run it first"):
        report_optimum_shifting([run], tmp_path / "out")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"models": ("vgg",)}, "unknown; choose from"), ({"seeds": ()}, "seeds is empty"),
    ({"val_fraction": 1.0}, "val_fraction"), ({"weight_decays": (-1.0,)}, "weight_decays"),
    ({"steps": 0}, "steps must be >= 1"), ({"cnn_channels": (2,)}, "two conv widths"),
    ({"subset": -1}, "subset must be >= 0"), ({"trace_probes": 1}, "standard error"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimumShiftingConfig(**kwargs)


def test_batch_larger_than_training_split_is_an_error():
    with pytest.raises(ValueError, match="lower batch_size"):
        prepare_data(OptimumShiftingConfig(batch_size=5000))


def test_curvature_is_exact_for_relu_and_falls_back_to_hutchinson_for_tanh():
    import torch
    from torch import nn

    from graddyn.curvature import dense_hessian
    from graddyn.experiments.optimum_shifting import curvature

    torch.manual_seed(0)
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    for act, exact in ((nn.ReLU(), 1.0), (nn.Tanh(), 0.0)):
        model = nn.Sequential(nn.Linear(5, 6), act, nn.Linear(6, 3)).double()
        out = curvature(model, (x, y), TINY, seed=0, eigen=False)
        assert out["trace_exact"] == exact and (out["trace_se"] == 0) == bool(exact)
        if exact:
            dense = dense_hessian(model, nn.functional.cross_entropy, (x, y))
            assert out["trace"] == pytest.approx(float(dense.trace()), rel=1e-9)
