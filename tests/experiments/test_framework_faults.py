"""Runs under faults, in process: Ctrl-C, a second writer, a full or read-only disk, a failure
while starting, a resume of nothing, a torchrun rank other than 0, hostile names."""

import errno
import os
import shlex
import tempfile

import pytest

import graddyn.experiments._runner as runner_module
from graddyn.cli import main
from graddyn.experiments import EXPERIMENTS, ConfigError, report, run_experiment, show
from graddyn.experiments._base import Experiment
from graddyn.experiments._runner import RunInterrupted
from graddyn.experiments._smoke import SmokeConfig
from graddyn.train import RunNotFoundError, RunStore
from graddyn.train._diskio import StorageError
from graddyn.train._lock import RunLockedError
from graddyn.train._store import InvalidRunNameError

ARGS = ["steps=12", "checkpoint_every=4", "eval_every=2"]


def _metrics(run):
    return {n: run.history(n) for n in run.metric_names()}


def _same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0].tolist() == b[name][0].tolist(), name
        assert a[name][1].tobytes() == b[name][1].tobytes(), name


@pytest.fixture
def reference(tmp_path):
    return _metrics(run_experiment("smoke", ARGS, root=tmp_path / "ref", progress=False))


def _stop_at(monkeypatch, step, exc):
    """Raise ``exc`` when the trainer records ``step`` (after its metrics, before its
    checkpoint): a Ctrl-C or a failing disk at that moment."""
    import graddyn.train._trainer as trainer_module

    real = trainer_module.Trainer._record

    def record(self, st, last):
        if st.step == step:
            raise exc
        real(self, st, last)

    monkeypatch.setattr(trainer_module.Trainer, "_record", record)
    return lambda: monkeypatch.setattr(trainer_module.Trainer, "_record", real)


def test_ctrl_c_marks_interrupted_prints_one_line_and_resumes_exactly(tmp_path, capsys,
                                                                      monkeypatch, reference):
    undo = _stop_at(monkeypatch, 7, KeyboardInterrupt())
    root = str(tmp_path / "runs")
    code = main(["run", "smoke", "--root", root, "--quiet", "--name", "c", "--set", *ARGS])
    out, err = capsys.readouterr()
    assert code == 130 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "run c stopped by Ctrl-C; resume with: " in lines[0]
    command = lines[0].split("resume with: ")[1]
    assert command == f"graddyn run smoke --name c --root {root} --resume"
    run = RunStore(root).open("c")
    assert run.status == "interrupted" and run.get_meta("error") == "stopped by Ctrl-C"
    assert "resume with: graddyn run smoke" in show("c", root=root)
    undo()
    assert main(shlex.split(command)[1:] + ["--quiet"]) == 0  # the printed command, as is
    assert RunStore(root).open("c").status == "finished"
    _same(_metrics(RunStore(root).open("c")), reference)


def test_sigterm_takes_the_same_path(tmp_path, monkeypatch):
    _stop_at(monkeypatch, 3, KeyboardInterrupt("SIGTERM"))
    with pytest.raises(RunInterrupted, match="stopped by SIGTERM; resume with: graddyn run"):
        run_experiment("smoke", ARGS, root=tmp_path, run_name="t", progress=False)
    assert RunStore(tmp_path).open("t").get_meta("error") == "stopped by SIGTERM"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["disk-full", "read-only"])
def test_disk_failure_names_the_path_and_the_run_resumes_exactly(tmp_path, capsys, monkeypatch,
                                                                 reference, code):
    import graddyn.train._store as store_module

    real, calls = store_module.write_bytes, []

    def second_checkpoint_fails(path, data):
        calls.append(path)
        if len(calls) == 2:  # the step-4 checkpoint; step 0's went through
            real(path, bytes(data)[:100])  # a partial temp file, as a full disk leaves it
            raise OSError(code, os.strerror(code))
        real(path, data)

    monkeypatch.setattr(store_module, "write_bytes", second_checkpoint_fails)
    root = str(tmp_path / "runs")
    exit_code = main(["run", "smoke", "--root", root, "--quiet", "--name", "d", "--set", *ARGS])
    err = capsys.readouterr().err
    assert exit_code == 1
    assert f"StorageError: [Errno {code}] cannot write {root}/d/checkpoints/step_00000004.pt" in err
    assert f"resume with: graddyn run smoke --name d --root {root} --resume" in err
    run = RunStore(root).open("d")
    assert run.status == "interrupted" and "step_00000004.pt" in run.get_meta("error")
    assert not list((run.dir / "checkpoints").glob("*.tmp"))
    monkeypatch.setattr(store_module, "write_bytes", real)
    resumed = run_experiment("smoke", root=root, run_name="d", resume=True, progress=False)
    assert resumed.status == "finished"
    _same(_metrics(resumed), reference)


def test_status_stays_true_when_the_disk_refuses_the_status_write_too(tmp_path, monkeypatch):
    import graddyn.train._store as store_module

    def full(self, **items):
        raise StorageError(errno.ENOSPC, "cannot write run.sqlite: disk is full")

    _stop_at(monkeypatch, 5, StorageError(errno.ENOSPC, "cannot write x: no space"))
    monkeypatch.setattr(store_module.Run, "interrupt", lambda self, r: full(self))
    with pytest.raises(StorageError, match="cannot write x"):  # the first cause, not the second
        run_experiment("smoke", ARGS, root=tmp_path, run_name="s", progress=False)
    run = RunStore(tmp_path).open("s")
    assert run.get_meta("status") == "running" and run.status == "interrupted"


def test_second_writer_is_refused_and_the_cli_says_so(tmp_path, capsys):
    run_experiment("smoke", ["steps=2"], root=tmp_path, run_name="w", progress=False)
    RunStore(tmp_path).open("w").set_meta(status="failed")  # resumable
    holder = RunStore(tmp_path).open("w", lock=True)  # a live writer (this process)
    with pytest.raises(RunLockedError, match=f"being written by pid {os.getpid()}"):
        run_experiment("smoke", root=tmp_path, run_name="w", resume=True)
    code = main(["run", "smoke", "--root", str(tmp_path), "--name", "w", "--resume"])
    assert code == 2 and "stop that process and resume" in capsys.readouterr().err
    holder.close()
    assert run_experiment("smoke", root=tmp_path, run_name="w", resume=True,
                          progress=False).status == "finished"


def test_resume_of_a_run_that_does_not_exist(tmp_path, capsys):
    with pytest.raises(RunNotFoundError, match="nothing to resume: no run 'ghost'.*drop --resume"):
        run_experiment("smoke", root=tmp_path, run_name="ghost", resume=True)
    assert RunStore(tmp_path).names() == []
    code = main(["run", "smoke", "--root", str(tmp_path), "--name", "ghost", "--resume"])
    assert code == 2 and "nothing to resume" in capsys.readouterr().err


def test_failure_while_starting_leaves_no_folder(tmp_path, capsys):
    argv = ["run", "coherent-gradients.label-noise", "--root", str(tmp_path / "runs"),
            "--name", "nodata", "--quiet", "--set", "dataset=cifar10",
            f"data_root={tmp_path / 'empty'}"]
    for _ in range(2):  # the same command fails the same way, not with "already exists"
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "DatasetNotFoundError" in err and "already exists" not in err
        assert not (tmp_path / "runs" / "nodata").exists()


class _Echo(Experiment):
    """Records the config and handle it was given (a stand-in for a torchrun worker)."""

    Config = SmokeConfig
    seen: list = []

    def run(self, config, run):
        _Echo.seen.append((config, run))


def _scratch_folders():
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("graddyn-rank")}


@pytest.fixture
def rank1(monkeypatch):
    monkeypatch.setitem(EXPERIMENTS._items, "test-echo", _Echo)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    _Echo.seen = []


def test_rank_other_than_0_reads_the_config_from_the_store(tmp_path, rank1, monkeypatch):
    before = _scratch_folders()
    monkeypatch.delenv("RANK")
    RunStore(tmp_path).create("d1", {"steps": 7, "lr": 0.5}, experiment="test-echo").close()
    monkeypatch.setenv("RANK", "1")
    run = run_experiment("test-echo", root=tmp_path, run_name="d1", resume=True)  # no --set
    (config, handle), = _Echo.seen
    assert config.steps == 7 and config.lr == 0.5 and handle is run and run.readonly
    with pytest.raises(PermissionError, match="only rank 0 writes"):
        run.log(0, {"x": 1.0})
    assert _scratch_folders() == before  # no graddyn-rank* scratch runs any more
    assert RunStore(tmp_path).names() == ["d1"]


def test_rank_other_than_0_waits_for_rank_0_then_names_the_fix(tmp_path, rank1, monkeypatch):
    monkeypatch.setattr(runner_module, "RANK_WAIT_S", 0.3)
    with pytest.raises(RunNotFoundError, match="rank 1: run 'x' did not appear .* same --root"):
        run_experiment("test-echo", root=tmp_path, run_name="x")


def test_rank_other_than_0_checks_the_experiment_and_skips_finished_runs(tmp_path, rank1,
                                                                         monkeypatch):
    monkeypatch.delenv("RANK")
    RunStore(tmp_path).create("s", {}, experiment="smoke").close()
    done = RunStore(tmp_path).create("f", {}, experiment="test-echo")
    done.finish()
    done.close()
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="belongs to experiment 'smoke'"):
        run_experiment("test-echo", root=tmp_path, run_name="s")
    assert run_experiment("test-echo", root=tmp_path, run_name="f").name == "f"
    assert _Echo.seen == []


@pytest.mark.parametrize("argv", [
    ["report", "../../outside"], ["run", "smoke", "--name", "bad\n"],
    ["run", "smoke", "--name", "../x"], ["show", "a/b"],
], ids=["report-escape", "trailing-newline", "run-escape", "show-slash"])
def test_bad_names_are_usage_errors(tmp_path, capsys, argv):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sweep.json").write_text('{"experiment": "smoke", "runs": []}')
    root = tmp_path / "a" / "b"
    root.mkdir(parents=True)
    assert main([*argv, "--root", str(root)]) == 2
    assert "invalid run name" in capsys.readouterr().err
    assert not (outside / "report").exists()
    with pytest.raises(InvalidRunNameError):
        report("../../outside", root=root)


@pytest.mark.parametrize("setting, key", [("eval_every=0", "eval_every"),
                                          ("checkpoint_every=0", "checkpoint_every")])
def test_schedule_settings_are_checked_with_the_key(tmp_path, capsys, setting, key):
    assert main(["run", "smoke", "--root", str(tmp_path), "--set", setting]) == 2
    assert f"{key} must be >= 1, got 0" in capsys.readouterr().err
    assert RunStore(tmp_path).names() == []


def test_run_time_config_check_is_a_usage_error(tmp_path, capsys):
    code = main(["run", "coherent-gradients.label-noise", "--root", str(tmp_path), "--quiet",
                 "--set", "dataset=digits", "n_train=100000"])
    assert code == 2 and "n_train=100000 exceeds" in capsys.readouterr().err
    assert RunStore(tmp_path).names() == []
