import json

import pytest

from graddyn.experiments import ConfigError, report, run_sweep, show
from graddyn.experiments._smoke import SmokeConfig
from graddyn.experiments._sweep import SweepInterrupted, expand_grid, parse_grid, sweep_name
from graddyn.train import RunNotFoundError, RunStore


def test_parse_and_expand_grid():
    axes = parse_grid(SmokeConfig, ["noise=0,0.5", "lr=0.1,0.2"])
    assert axes == {"noise": ["0", "0.5"], "lr": ["0.1", "0.2"]}
    pts = expand_grid(axes, ["steps=3"])
    assert pts[0] == ["steps=3", "noise=0", "lr=0.1"] and len(pts) == 4
    assert sweep_name("smoke", axes, []) == sweep_name("smoke", dict(axes), [])


@pytest.mark.parametrize(
    "grid, msg",
    [
        (["nois=0,1"], "unknown config key 'nois'"),
        (["noise=0,"], "empty value in grid"),
        ([], "at least one --grid"),
    ],
    ids=["unknown-key", "empty-value", "no-axes"],
)
def test_bad_grids(grid, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_grid(SmokeConfig, grid)


def test_bad_grid_value_is_caught_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="bad value for noise"):
        run_sweep("smoke", ["noise=0,lots"], root=tmp_path)
    assert RunStore(tmp_path).names() == []
    with pytest.raises(ValueError, match="workers must be >= 1"):
        run_sweep("smoke", ["noise=0"], root=tmp_path, workers=0)
    for bad in ({"backend": "slurm"}, {"retries": -1}, {"address": "10.0.0.1:6379"}):
        with pytest.raises(ValueError, match="backend must be one of local, ray"):
            run_sweep("smoke", ["noise=0"], root=tmp_path, **bad)


def test_sweep_in_parallel_skips_finished_and_reports(tmp_path):
    base = ["steps=4", "eval_every=2"]
    first = run_sweep("smoke", ["noise=0", "lr=0.1,0.05"], base, root=tmp_path)
    res = run_sweep("smoke", ["noise=0,0.5", "lr=0.1,0.05"], base, root=tmp_path, workers=2)
    assert len(res.runs) == 4 and res.failed == {}
    assert res.skipped == first.runs  # the noise=0 points were already finished
    manifest = json.loads((res.dir / "sweep.json").read_text())
    assert manifest["grid"] == {"noise": ["0", "0.5"], "lr": ["0.1", "0.05"]}
    assert set(manifest["status"].values()) == {"finished"}
    html = report(res.name, root=tmp_path)
    page = html.read_text()
    assert html == res.dir / "report" / "report.html" and page.count("<details>") == 4
    assert "data:image/png;base64" in page
    text = show(res.runs[1], root=tmp_path)
    assert "status     finished" in text and "test/acc" in text


def test_report_unknown_target(tmp_path):
    with pytest.raises(RunNotFoundError, match="no run or sweep named 'x'"):
        report("x", root=tmp_path)


def test_failing_point_in_a_worker_process_is_recorded_and_the_others_finish(tmp_path):
    res = run_sweep("smoke", ["lr=0.1,nan"], ["steps=3"], root=tmp_path, workers=2, name="f")
    manifest = json.loads((res.dir / "sweep.json").read_text())
    good, bad = res.runs
    assert manifest["status"] == {good: "finished", bad: "failed"}
    assert list(res.failed) == [bad] and "NonFiniteLossError" in res.failed[bad]
    assert manifest["errors"] == res.failed


def test_interrupted_sweep_writes_the_manifest_and_gives_the_command(tmp_path, monkeypatch):
    import graddyn.experiments._sweep as sweep_module

    real = sweep_module._run_point

    def second_point_interrupted(experiment, overrides, root, run_name, *rest):
        if "noise=0.5" in overrides:
            raise KeyboardInterrupt
        return real(experiment, overrides, root, run_name, *rest)

    monkeypatch.setattr(sweep_module, "_run_point", second_point_interrupted)
    with pytest.raises(SweepInterrupted, match="sweep sw interrupted; finished runs are kept; "
                                               "resume the rest with: graddyn sweep smoke "
                                               "--grid noise=0,0.5 --set steps=2 --workers 1 "
                                               f"--name sw --root {tmp_path}$"):
        run_sweep("smoke", ["noise=0,0.5"], ["steps=2"], root=tmp_path, name="sw")
    manifest = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert sorted(manifest["status"].values()) == ["finished", "missing"]
