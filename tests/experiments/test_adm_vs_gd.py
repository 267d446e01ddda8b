"""Experiment ``adm-vs-gd``: a tiny config runs and reports in seconds; the shapes data."""

import pytest

from graddyn.experiments import EXPERIMENTS, config_to_dict
from graddyn.experiments._shapes import make_shapes
from graddyn.experiments.adm_vs_gd import AdmVsGdConfig, report_adm_vs_gd, run_adm_vs_gd
from graddyn.train import RunStore

TINY = AdmVsGdConfig(n_images=2, size=12, width=4, warmup_steps=2, outer=2, inner_steps=2,
                     seeds=(0, 1))


def test_tiny_run_and_report(tmp_path):
    run = RunStore(tmp_path).create("tiny", config_to_dict(TINY))
    run_adm_vs_gd(TINY, run)
    for seed in (0, 1):
        for method in ("gd", "adm"):
            steps, miou = run.history(f"seed{seed}/{method}/miou")
            assert steps.tolist() == [0, 2, 4] and ((0 <= miou) & (miou <= 1)).all()
            assert len(run.history(f"seed{seed}/{method}/reg_loss")[0]) == 3
        assert len(run.history(f"seed{seed}/adm/labels_miou")[0]) == 2
    paths = report_adm_vs_gd([run], tmp_path / "out")
    assert [p.name for p in paths] == ["tiny_adm_vs_gd.png"]
    assert "ADM reaches a lower regularised loss" in (tmp_path / "out" / "tiny_verdict.md"
                                                      ).read_text()


def test_verdicts_on_known_values():
    import numpy as np

    from graddyn.experiments.adm_vs_gd import verdicts

    gd = np.array([0.72, 0.74, 0.87])
    rows = verdicts({"gd": gd, "adm": gd - 0.03}, {"gd": gd * 0.05, "adm": gd * 0.05})
    assert [r.verdict for r in rows] == ["fails", "fails"]  # a tie on the loss; ADM worse
    one = verdicts({"gd": gd[:1], "adm": gd[:1] + 0.1}, {"gd": gd[:1], "adm": gd[:1] - 1})
    assert [r.verdict for r in one] == ["inconclusive", "inconclusive"]
    assert EXPERIMENTS.get("adm-vs-gd")().demo_config().outer == 8


def test_shapes_data():
    d = make_shapes(5, size=16, seed=1)
    lab = d.scribbles >= 0
    assert (d.scribbles[lab] == d.masks[lab]).all()
    assert (d.scribbles == 1).flatten(1).any(1).all()
    assert (d.scribbles == 0).flatten(1).any(1).all()
    assert lab.float().mean() < 0.1  # scribbles are thin
    with pytest.raises(ValueError, match="size >= 12"):
        make_shapes(1, size=8)
    with pytest.raises(ValueError, match="noise"):
        make_shapes(1, noise=-1.0)


def test_report_needs_records(tmp_path):
    run = RunStore(tmp_path).create("empty", config_to_dict(TINY))
    with pytest.raises(ValueError, match="run it first"):
        report_adm_vs_gd([run], tmp_path / "out")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"outer": 0}, "outer must be > 0"), ({"size": 8}, "size must be >= 12"),
     ({"proximity": 0.0}, "proximity"), ({"seeds": ()}, "seeds must be a non-empty")],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdmVsGdConfig(**kwargs)
