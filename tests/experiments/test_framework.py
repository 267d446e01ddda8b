import sys
from dataclasses import dataclass
from typing import Literal

import pytest

import graddyn.experiments as ex
from graddyn._registry import UnknownNameError
from graddyn.experiments import (
    EXPERIMENTS,
    ConfigError,
    Experiment,
    config_from_dict,
    config_to_dict,
    default_run_name,
    parse_overrides,
    run_experiment,
)
from graddyn.train import RunExistsError, RunStore


@dataclass(frozen=True)
class C:
    steps: int = 10
    lr: float = 0.1
    flag: bool = False
    name: str = "x"
    widths: tuple[int, ...] = (8, 8)
    pair: tuple[int, float] = (1, 0.5)
    act: Literal["relu", "tanh"] = "relu"
    cap: int | None = None

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


def test_parse_overrides_types():
    c = parse_overrides(C, ["steps=3", "lr=1e-3", "flag=yes", "name=a=b", "widths=4,2,1",
                            "pair=2,0.25", "act=tanh", "cap=7"])
    assert c == C(3, 1e-3, True, "a=b", (4, 2, 1), (2, 0.25), "tanh", 7)
    assert parse_overrides(C, ["cap=none", "widths="]) == C(cap=None, widths=())
    assert parse_overrides(C, []) == C()


@pytest.mark.parametrize(
    "item, msg",
    [
        ("stpes=3", "unknown config key 'stpes' for C; did you mean 'steps'\\?; valid keys: "
                    "steps, lr"),
        ("steps=1.5", "bad value for steps: '1.5' is not int"),
        ("lr=fast", "bad value for lr: 'fast' is not float"),
        ("flag=maybe", "bad value for flag: 'maybe' is not bool"),
        ("act=gelu", "expected one of relu, tanh"),
        ("widths=4,x", "bad value for widths: 'x' is not int"),
        ("pair=1", "has 1 items, expected 2"),
        ("cap=lots", "is not int"),
        ("steps", "expected key=value"),
        ("steps=-1", "invalid C: steps must be >= 0"),
    ],
    ids=["unknown", "int", "float", "bool", "literal", "tuple-elem", "tuple-len", "optional",
         "no-equals", "post-init"],
)
def test_parse_overrides_errors(item, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        parse_overrides(C, [item])


def test_config_roundtrip_and_run_names():
    c = parse_overrides(C, ["widths=1,2", "lr=0.50"])
    assert config_from_dict(C, config_to_dict(c)) == c
    assert default_run_name("exp", C()) == "exp"
    assert default_run_name("exp", c) == "exp__lr=0.5_widths=1,2"
    assert default_run_name("exp", parse_overrides(C, ["lr=.5", "widths=1, 2"])) == \
        default_run_name("exp", c)
    long = default_run_name("exp", C(name="y" * 300))
    assert len(long) == 120 and long == default_run_name("exp", C(name="y" * 300))
    with pytest.raises(ConfigError, match="unknown config key 'zz'"):
        config_from_dict(C, {"zz": 1})


class Failing(Experiment):
    """Raises half-way, for the failure path."""

    Config = C

    def run(self, config, run):
        run.log(0, {"x": 1.0})
        raise RuntimeError("boom")


@pytest.fixture
def failing(monkeypatch):
    monkeypatch.setitem(EXPERIMENTS._items, "test-failing", Failing)


def test_run_experiment_lifecycle(tmp_path):
    run = run_experiment("smoke", ["steps=6", "eval_every=3"], root=tmp_path, progress=False)
    assert run.name == "smoke__eval_every=3_steps=6" and run.status == "finished"
    assert run.config["steps"] == 6 and run.get_meta("overrides") == ["steps=6", "eval_every=3"]
    assert run.history("test/acc")[0].tolist() == [0, 3, 6]
    with pytest.raises(RunExistsError, match="pass --resume to continue it or --name"):
        run_experiment("smoke", ["steps=6", "eval_every=3"], root=tmp_path)
    again = run_experiment("smoke", root=tmp_path, run_name=run.name, resume=True)
    assert again.status == "finished"  # finished: nothing to do, saved config used
    with pytest.raises(ConfigError, match="different config \\(differs in: steps\\)"):
        run_experiment("smoke", ["steps=7"], root=tmp_path, run_name=run.name, resume=True)


def test_a_run_saved_before_a_field_existed_resumes_with_its_default(tmp_path):
    run = run_experiment("smoke", ["steps=3"], root=tmp_path, progress=False)
    old = {k: v for k, v in run.config.items() if k != "optimizer"}  # as if made before it
    run.set_meta(config=old, status="interrupted")
    again = run_experiment("smoke", ["steps=3"], root=tmp_path, resume=True, progress=False)
    assert again.status == "finished"


def test_failing_run_is_marked_failed(tmp_path, failing):
    with pytest.raises(RuntimeError, match="boom"):
        run_experiment("test-failing", root=tmp_path)
    run = RunStore(tmp_path).open("test-failing")
    assert run.status == "failed" and run.get_meta("error") == "RuntimeError: boom"
    assert run.history("x")[1].tolist() == [1.0]
    with pytest.raises(ConfigError, match="belongs to experiment 'test-failing'"):
        run_experiment("smoke", root=tmp_path, run_name="test-failing", resume=True)


def test_unknown_experiment_lists_names_and_import_errors(monkeypatch):
    monkeypatch.setitem(ex.IMPORT_ERRORS, "broken", "ImportError: no module named foo")
    with pytest.raises(UnknownNameError, match="valid names: .*smoke.*broken: ImportError"):
        run_experiment("nope")


def test_discovery_survives_a_broken_module(tmp_path, monkeypatch):
    pkg = tmp_path / "extra"
    pkg.mkdir()
    (pkg / "good_mod.py").write_text("X = 1\n")
    (pkg / "bad_mod.py").write_text("raise ImportError('needs foo')\n")
    (pkg / "_private.py").write_text("raise RuntimeError('never imported')\n")
    monkeypatch.setattr(ex, "__path__", [str(pkg)])
    monkeypatch.setattr(ex, "IMPORT_ERRORS", {})
    ex._discover()
    assert ex.IMPORT_ERRORS == {"bad_mod": "ImportError: needs foo"}
    assert "graddyn.experiments.good_mod" in sys.modules
    monkeypatch.delitem(sys.modules, "graddyn.experiments.good_mod")


def test_default_report_and_demo_config(tmp_path):
    run = run_experiment("smoke", ["steps=3"], root=tmp_path, progress=False)
    exp = ex.get_experiment("smoke")
    paths = exp.report([run], tmp_path / "out")
    assert [p.name for p in paths] == ["metrics.png", "confusion.png"]
    assert exp.demo_config() == exp.Config() and exp.summary().startswith("Built-in")
