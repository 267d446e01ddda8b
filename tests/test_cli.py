import pytest

import graddyn.cli as cli
from graddyn.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for section in ("experiments:", "instruments:", "datasets:", "models:"):
        assert section in out
    assert "smoke" in out
    code, out, _ = run_cli(capsys, "list", "experiments")
    assert code == 0 and "models:" not in out


def test_list_tolerates_missing_package(monkeypatch, capsys):
    monkeypatch.setitem(cli._REGISTRIES, "models", ("graddyn.no_such_pkg", "MODELS"))
    code, out, _ = run_cli(capsys, "list", "models")
    assert code == 0 and "not available: ModuleNotFoundError" in out


def test_list_shows_broken_experiment_modules(monkeypatch, capsys):
    import graddyn.experiments as ex

    monkeypatch.setitem(ex.IMPORT_ERRORS, "broken", "ImportError: needs foo")
    code, out, _ = run_cli(capsys, "list", "experiments")
    assert "[failed to import broken] ImportError: needs foo" in out


def test_run_show_report(tmp_path, capsys):
    root = str(tmp_path)
    code, out, _ = run_cli(capsys, "run", "smoke", "--root", root, "--quiet",
                           "--set", "steps=4", "eval_every=2", "--name", "mine")
    assert code == 0 and "run mine: finished" in out
    code, out, _ = run_cli(capsys, "show", "mine", "--root", root)
    assert code == 0 and "train/acc" in out and "status     finished" in out
    code, out, _ = run_cli(capsys, "report", "mine", "--root", root)
    assert code == 0 and (tmp_path / "mine" / "report" / "report.html").is_file()
    code, out, _ = run_cli(capsys, "run", "smoke", "--root", root, "--name", "mine",
                           "--resume", "--quiet")
    assert code == 0 and "finished" in out


def test_sweep(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "sweep", "smoke", "--root", str(tmp_path),
                           "--grid", "noise=0,0.5", "--set", "steps=2", "--name", "sw")
    assert code == 0 and "sweep sw: 2 runs, 0 already finished, 0 failed" in out
    assert (tmp_path / "sw" / "sweep.json").is_file()
    code, out, _ = run_cli(capsys, "report", "sw", "--root", str(tmp_path))
    assert code == 0 and "sw/report/report.html" in out


def test_demo_falls_back_to_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "DEMO_EXPERIMENT", "not-there-yet")
    code, out, err = run_cli(capsys, "demo", "--root", str(tmp_path), "--quiet")
    assert code == 0 and "running the built-in 'smoke'" in err
    assert "demo report:" in out and (tmp_path / "demo-smoke" / "report" / "report.html").is_file()


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["run", "nope"], "unknown experiment 'nope'; valid names: "),
        (["run", "smoke", "--set", "stpes=3"], "unknown config key 'stpes' for SmokeConfig; "
                                                 "did you mean 'steps'?; valid keys: n_train"),
        (["run", "smoke", "--set", "noise=lots"], "bad value for noise: 'lots' is not float"),
        (["run", "smoke", "--set", "optimizer=lbfgs"], "expected one of sgd, adam"),
        (["run", "smoke", "--set", "noise=2"], "noise must be in [0, 1]"),
        (["sweep", "smoke", "--grid", "nois=0,1"], "unknown config key 'nois'"),
        (["show", "nothing"], "no run 'nothing'"),
        (["report", "nothing"], "no run or sweep named 'nothing'"),
    ],
    ids=["unknown-experiment", "unknown-key", "bad-float", "bad-choice", "post-init",
         "sweep-key", "show-missing", "report-missing"],
)
def test_usage_errors_exit_2(tmp_path, capsys, argv, msg):
    code, _, err = run_cli(capsys, *argv, "--root", str(tmp_path))
    assert code == 2 and msg in err


def test_existing_run_needs_resume_and_failures_exit_1(tmp_path, capsys, monkeypatch):
    root = str(tmp_path)
    assert run_cli(capsys, "run", "smoke", "--root", root, "--set", "steps=1", "--quiet")[0] == 0
    code, _, err = run_cli(capsys, "run", "smoke", "--root", root, "--set", "steps=1")
    assert code == 2 and "pass --resume to continue it or --name" in err
    code, _, err = run_cli(capsys, "run", "smoke", "--root", root, "--set", "lr=nan",
                           "steps=3", "--quiet")
    assert code == 1 and "NonFiniteLossError" in err and "step 1" in err


def test_list_experiment_prints_every_key_with_type_default_and_help(capsys):
    from dataclasses import fields

    from graddyn.experiments import get_experiment

    code, out, _ = run_cli(capsys, "list", "coherent-gradients.winsorize")
    assert code == 0 and "config keys (graddyn run coherent-gradients.winsorize --set" in out
    rows = {line.split()[0]: line for line in out.splitlines()[4:]}
    for f in fields(get_experiment("coherent-gradients.winsorize").Config):
        assert f.name in rows
    assert rows["model"].split()[1:3] == ["{mlp,cnn}", "mlp"]
    assert "fraction eps of training labels" in rows["noise"]
    assert all(len(line.split(maxsplit=3)) == 4 for line in rows.values())  # help everywhere


def test_list_describes_without_markup_or_cut_sentences(capsys):
    code, out, _ = run_cli(capsys, "list", "instruments")
    assert code == 0 and "``" not in out
    learned = next(line for line in out.splitlines() if line.split()[0] == "learned_at")
    assert learned.rstrip().endswith(".")


def test_did_you_mean(tmp_path, capsys):
    code, _, err = run_cli(capsys, "list", "coherent-gradients.winsorise")
    assert code == 2 and "did you mean 'coherent-gradients.winsorize'?" in err
    code, _, err = run_cli(capsys, "run", "smoke", "--set", "stpes=3", "--root", str(tmp_path))
    assert code == 2 and "did you mean 'steps'?" in err
    code, _, err = run_cli(capsys, "run", "smoke", "--log", "tensorbord", "--root", str(tmp_path))
    assert code == 2 and "did you mean 'tensorboard'?" in err


def test_help_imports_nothing_heavy():
    """`graddyn --help` must start at once: it imports neither torch nor any experiment."""
    import subprocess
    import sys

    code = ("import sys\nfrom graddyn.cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'numpy', "
            "'graddyn.experiments') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_listing_experiments_imports_none_of_them():
    """`graddyn list experiments` reads the experiments' sources instead of importing them."""
    import subprocess
    import sys

    code = ("import sys\nfrom graddyn.cli import list_registry\nlines = list_registry("
            "'experiments')\nassert any('winsorize' in l for l in lines), lines\n"
            "print([m for m in sys.modules if m == 'torch' or m.startswith("
            "'graddyn.experiments.') and m.split('.')[-1][0] != '_'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"  # no experiment module, not even torch


def test_grid_and_set_of_one_key_is_an_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "sweep", "smoke", "--grid", "noise=0,0.5", "--set",
                           "noise=0.1", "--root", str(tmp_path))
    assert code == 2 and "noise given both as a --grid axis and with --set" in err


def test_sweep_progress_and_show_of_a_sweep(tmp_path, capsys):
    root = str(tmp_path)
    code, out, err = run_cli(capsys, "sweep", "smoke", "--grid", "noise=0,0.5", "--set",
                             "steps=2", "eval_every=1", "--name", "sw", "--root", root)
    assert code == 0
    lines = err.strip().splitlines()
    assert lines[0].startswith("sweep sw: 2 points, 0 already finished, 2 to run")
    assert [line.split()[0] for line in lines[1:]] == ["[1/2]", "[2/2]"]
    assert all(": finished (" in line for line in lines[1:])
    code, out, _ = run_cli(capsys, "sweep", "smoke", "--grid", "noise=0,0.5", "--set",
                           "steps=2", "eval_every=1", "--name", "sw", "--root", root, "--quiet")
    assert code == 0 and "2 already finished" in out
    code, out, _ = run_cli(capsys, "show", "sw", "--root", root)
    assert code == 0 and out.startswith("sweep      sw")
    header = next(line for line in out.splitlines() if line.startswith("run "))
    assert header.split()[:5] == ["run", "status", "noise", "test/acc", "train/acc"]
    assert out.count(" finished ") == 2


def test_resume_by_run_name(tmp_path, capsys):
    root = str(tmp_path)
    assert run_cli(capsys, "run", "smoke", "--set", "steps=2", "--name", "intr", "--root", root,
                   "--quiet")[0] == 0
    code, out, _ = run_cli(capsys, "run", "intr", "--resume", "--root", root, "--quiet")
    assert code == 0 and "run intr: finished" in out


def test_broken_pipe_ends_quietly(tmp_path):
    """`graddyn show RUN | head -1`: no BrokenPipeError traceback."""
    import subprocess
    import sys

    root = str(tmp_path)
    run = [sys.executable, "-m", "graddyn"]
    subprocess.run([*run, "run", "smoke", "--set", "steps=2", "--name", "p", "--root", root,
                    "--quiet"], check=True, capture_output=True)
    shown = subprocess.run(f"{sys.executable} -m graddyn show p --root {root} | head -1",
                           shell=True, capture_output=True, text=True)
    assert shown.stdout.startswith("run ") and "Error" not in shown.stderr


def test_cmd_show_stops_quietly_when_the_reader_leaves(tmp_path, capsys, monkeypatch):
    def gone(args):
        raise BrokenPipeError

    monkeypatch.setattr(cli, "cmd_show", gone)
    monkeypatch.setattr(cli, "_silence_stdout", lambda: None)  # pytest's capture stays
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), "show", gone))
    assert main(["show", "x", "--root", str(tmp_path)]) == 141


def _with_func(parser, command, func):
    parser._subparsers._group_actions[0].choices[command].set_defaults(func=func)
    return parser


def test_log_and_export(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    root = str(tmp_path)
    code, _, _ = run_cli(capsys, "run", "smoke", "--set", "steps=3", "--name", "lg", "--root",
                         root, "--quiet", "--log", "tensorboard")
    assert code == 0 and list((tmp_path / "lg" / "tensorboard").glob("events.out.tfevents*"))
    code, out, _ = run_cli(capsys, "export", "lg", "--to", "csv", "--root", root)
    assert code == 0 and (tmp_path / "lg" / "metrics.csv").is_file()
    code, _, err = run_cli(capsys, "export", "nope", "--to", "csv", "--root", root)
    assert code == 2 and "no run 'nope'" in err


def test_export_without_the_package_names_it(tmp_path, capsys, monkeypatch):
    import importlib.util

    root = str(tmp_path)
    assert run_cli(capsys, "run", "smoke", "--set", "steps=1", "--name", "e", "--root", root,
                   "--quiet")[0] == 0
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    code, _, err = run_cli(capsys, "export", "e", "--to", "mlflow", "--root", root)
    assert code == 2 and "pip install 'graddyn[mlflow]'" in err


def test_every_experiment_key_has_help():
    from graddyn.experiments import EXPERIMENTS
    from graddyn.experiments._config import describe_config

    missing = {name: [k for k, _, _, h in describe_config(EXPERIMENTS.get(name).Config) if not h]
               for name in EXPERIMENTS.names()}
    assert not {n: m for n, m in missing.items() if m}


def test_calibrate_writes_the_rates_the_cost_model_reads(tmp_path, capsys, monkeypatch):
    from graddyn.pergrad._cost import Rates, rates

    path = tmp_path / "cost.json"
    monkeypatch.setenv("GRADDYN_COST_FILE", str(path))
    rates.cache_clear()
    try:
        assert main(["calibrate", "--threads", "1"]) == 0
        assert str(path) in capsys.readouterr().out
        got = rates("cpu")
        assert got != Rates() and got.ghost > 0 and got.build > 0
    finally:
        rates.cache_clear()
