"""The gradient-transfer experiment: tiny configs run end to end and produce the figures."""

import pytest
import torch
from torch import nn

from graddyn.experiments import EXPERIMENTS, report, run_experiment
from graddyn.experiments._gradient_transfer_report import verdicts
from graddyn.experiments._gradient_transfer_studies import (
    derangement,
    output_layer,
    permute_output_units,
)
from graddyn.experiments._seeds import SeedRun
from graddyn.experiments.gradient_transfer import GradientTransferConfig

TINY = [
    "max_train=240",
    "max_test=80",
    "width=16",
    "depth=1",
    "epochs=3",
    "alphas=0,1,2",
    "ewc_lambdas=100",
    "n_points=3",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for study, extra in (
        ("alpha-sweep", ["seeds=0,1"]),
        ("fusion", ["seeds=0,1"]),
        ("forgetting", ["seeds=0"]),
        ("forgetting", ["tasks=permuted", "seeds=0"]),
    ):
        run = run_experiment("gradient-transfer", [f"study={study}", *TINY, *extra], root=root)
        out[(study, len(extra) > 1)] = (root, SeedRun(run, 0))  # the first seed's metrics
    return out


def test_registered():
    assert "gradient-transfer" in EXPERIMENTS


def test_alpha_sweep_sanity(runs):
    _, run = runs[("alpha-sweep", False)]
    alphas = list(run.history("alpha")[1])
    assert alphas == [0.0, 1.0, 2.0]
    # alpha = 1 onto its own init is the trained net, which is also scaled(alpha = 1)
    own, scaled = run.history("own-init/train_acc")[1], run.history("scaled/train_acc")[1]
    assert own[1] == pytest.approx(scaled[1])
    # zero transfer at alpha = 1 is g_A; scaled at alpha = 0 is the all-zero net (uniform logits)
    assert run.history("scaled/train_loss")[1][0] == pytest.approx(2.302585, rel=1e-5)
    for name in ("other-seed", "other-scheme", "zero", "scaled+noise"):
        assert len(run.history(f"{name}/test_acc")[1]) == 3


def test_label_permutation_control(runs):
    _, run = runs[("alpha-sweep", False)]
    h = lambda name: run.history(name)[1]  # noqa: E731
    for split in ("train", "test"):
        # alpha = 1 onto its own init reproduces A' (trained on pi(y)) against pi-labels
        for what in ("acc_pi", "loss_pi", "acc"):
            ref = h(f"perm-labels-trained/{split}_{what}")[0]
            assert h(f"perm-labels/own-init/{split}_{what}")[1] == pytest.approx(ref, abs=1e-6)
        # A' learned pi(y), not y (pi is a derangement, so the two are disjoint events)
        assert (
            h(f"perm-labels-trained/{split}_acc_pi")[0]
            > 2 * h(f"perm-labels-trained/{split}_acc")[0]
        )
        # alpha = 0 is the init itself, whatever g
        assert h(f"perm-rows/other-seed/{split}_acc")[0] == h(f"other-seed/{split}_acc")[0]
        # zero + alpha * P_out(g_A) is the zero transfer with its classes relabelled by pi
        # (alpha > 0: at alpha = 0 all logits tie and argmax picks class 0 either way)
        assert list(h(f"perm-rows/zero/{split}_acc_pi")[1:]) == pytest.approx(
            list(h(f"zero/{split}_acc")[1:]), abs=1e-6
        )


def test_output_unit_permutation_relabels_predictions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5))
    pi = derangement(5, torch.Generator().manual_seed(1))
    assert not (pi == torch.arange(5)).any() and sorted(pi.tolist()) == list(range(5))
    assert output_layer(model) == ["2.weight", "2.bias"]
    x = torch.randn(32, 4)
    before = model(x)
    model.load_state_dict(permute_output_units(model.state_dict(), output_layer(model), pi))
    after = model(x)
    assert torch.allclose(after[:, pi], before, atol=1e-6)
    assert torch.equal(after.argmax(1), pi[before.argmax(1)])


def test_fusion_and_forgetting_metrics(runs):
    _, fusion = runs[("fusion", False)]
    names = fusion.metric_names()
    for key in (
        "lmc-raw/test_loss_barrier",
        "lmc-aligned/train_loss_barrier",
        "interp-aligned/A/test_acc",
        "fuse-raw/B/test_task_acc",
    ):
        assert key in names
    # t = 0 of the A/B path is theta_B itself, whatever the alignment of A
    a0 = fusion.history("interp-raw/B/test_acc")[1][0]
    assert fusion.history("interp-aligned/B/test_acc")[1][0] == pytest.approx(a0)
    _, forget = runs[("forgetting", False)]
    for key in (
        "fine-tune/A/test_acc",
        "ewc-100/B/test_acc",
        "joint/A/test_acc",
        "transfer/B/test_acc",
        "fuse-aligned/A/test_acc",
    ):
        assert key in forget.metric_names()
    # transfer with alpha = 0 is the A-only model
    assert forget.history("transfer/A/test_acc")[1][0] == pytest.approx(
        forget.history("A-only/A/test_acc")[1][0]
    )
    _, permuted = runs[("forgetting", True)]
    assert "fine-tune/A/test_task_acc" not in permuted.metric_names()


def test_report_writes_figures_and_percent_tables(runs, tmp_path):
    for (study, permuted), (root, run) in runs.items():
        if permuted:
            continue
        html = report(run.name, root=root, out_dir=tmp_path / run.name)
        pngs = sorted(p.name for p in (tmp_path / run.name).glob("*.png"))
        assert html.exists() and pngs, study
        table = next(p for p in (tmp_path / run.name).glob("*.md") if "verdict" not in p.name)
        assert "(%)" in table.read_text()
        verdict = next((tmp_path / run.name).glob("*_verdict.md")).read_text()
        assert "Student-t interval" in verdict
        assert any(f"| {w} |" in verdict for w in ("holds", "fails", "inconclusive"))
    alpha_dir = tmp_path / runs[("alpha-sweep", False)][1].name
    assert len(list(alpha_dir.glob("*label_perm.png"))) == 1
    assert "against permuted labels pi(y)" in next(alpha_dir.glob("*sweep.md")).read_text()
    fusion_dir = tmp_path / runs[("fusion", False)][1].name
    assert len(list(fusion_dir.glob("*.png"))) == 2


def test_seeds_are_replicates_and_a_finished_seed_is_skipped(runs):
    root, view = runs[("alpha-sweep", False)]
    run = view.run
    a, b = SeedRun(run, 0), SeedRun(run, 1)
    assert a.history("other-seed/test_acc")[1][1] != b.history("other-seed/test_acc")[1][1]
    count = len(run.history("seed1/alpha")[0])
    from graddyn.experiments.gradient_transfer import run_gradient_transfer

    run_gradient_transfer(GradientTransferConfig(**{**run.config, "alphas": (0.0, 1.0, 2.0),
                                                    "seeds": (0, 1)}), run)
    assert len(run.history("seed1/alpha")[0]) == count  # both seeds were done: nothing rerun


def test_verdicts_on_known_values():
    import numpy as np

    one = np.array([0.8, 0.82, 0.79])
    v = {"trained": one + 0.1, "other@1": one, "other@best>1": one + 0.1,
         "transfer@max": one, "noise@max": one + 0.02, "perm@1 pi": one, "perm@1 y": one * 0}
    words = [r.verdict for r in verdicts("alpha-sweep", v)]
    assert words == ["holds", "holds", "holds", "holds"]
    v["other@best>1"] = v["other@1"]  # alpha > 1 changes nothing: a tie
    assert verdicts("alpha-sweep", v)[0].verdict == "fails"
    fus = {"lmc-raw": np.array([0.3, 0.35, np.nan]), "lmc-aligned": np.array([0.01] * 3)}
    assert verdicts("fusion", fus)[0].verdict == "inconclusive"  # a NaN is no evidence
    forget = {"ewc A": one, "fine-tune A": one * 0.1, "transfer best both": one,
              "fine-tune both": one}
    assert [r.verdict for r in verdicts("forgetting", forget)] == ["holds", "fails"]


def test_report_needs_results(tmp_path):
    from graddyn.experiments._gradient_transfer_report import report_gradient_transfer
    from graddyn.train import RunStore

    run = RunStore(tmp_path).create("empty", {"study": "fusion", "seeds": [0]})
    with pytest.raises(ValueError, match="run it first"):
        report_gradient_transfer([run], tmp_path / "out")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"study": "nope"}, "unknown study 'nope'"),
        ({"tasks": "rotated"}, "unknown tasks 'rotated'"),
        ({"model": "wide-resnet"}, "unknown model 'wide-resnet'"),
        ({"epochs": 0}, "epochs must be positive"),
        ({"n_points": 1}, "n_points must be positive"),
        ({"alphas": ()}, "alphas must be a non-empty list"),
        ({"seeds": (3, 3)}, "seeds must be distinct"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientTransferConfig(**kwargs)
