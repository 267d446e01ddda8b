import errno
import math
import os
import sqlite3

import numpy as np
import pytest
import torch

from graddyn.train import RunExistsError, RunNotFoundError, RunStore, new_figure
from graddyn.train._diskio import CorruptCheckpointError, RunStoreError, StorageError
from graddyn.train._lock import RunLockedError
from graddyn.train._store import CheckpointWarning, InvalidRunNameError


@pytest.fixture
def store(tmp_path):
    return RunStore(tmp_path / "runs")


def test_create_records_meta(store):
    run = store.create("a", {"lr": 0.1, "widths": [8, 8]}, seed=3, experiment="smoke")
    assert run.dir == store.root / "a" and (run.dir / "checkpoints").is_dir()
    assert run.config == {"lr": 0.1, "widths": [8, 8]} and run.seed == 3
    assert run.experiment == "smoke" and run.status == "running"
    assert "torch" in run.get_meta("versions") and run.get_meta("created")
    assert store.names() == ["a"] and store.exists("a")
    run.finish()
    assert store.open("a").status == "finished" and store.open("a").get_meta("finished")
    run.fail("boom")
    assert store.open("a").status == "failed" and store.open("a").get_meta("error") == "boom"


def test_metrics_committed_immediately(store):
    run = store.create("a", {})
    run.log(0, {"loss": 1.0, "acc": 0.5})
    run.log(2, {"loss": float("nan")})
    run.log(1, {"loss": 0.5})
    # another connection sees the rows without close: each log is committed
    rows = sqlite3.connect(run.dir / "run.sqlite").execute("SELECT count(*) FROM metrics")
    assert rows.fetchone()[0] == 4
    steps, vals = run.history("loss")
    assert steps.tolist() == [0, 1, 2] and vals[:2].tolist() == [1.0, 0.5]
    assert math.isnan(vals[2]) and steps.dtype == np.int64
    assert run.metric_names() == ["acc", "loss"]
    assert run.latest()["acc"] == (0, 0.5) and run.latest()["loss"][0] == 2
    run.log(1, {"loss": 0.25})  # same (name, step): last value wins
    assert run.history("loss")[1][1] == 0.25


def test_truncate_after_respects_prefix(store):
    run = store.create("a", {})
    for s in range(5):
        run.log(s, {"x": s, "t/y": s})
    assert run.truncate_after(2, prefix="t/") == 2
    assert run.history("t/y")[0].tolist() == [0, 1, 2]
    assert run.history("x")[0].tolist() == [0, 1, 2, 3, 4]


def test_checkpoints_roundtrip_weights_only(store):
    run = store.create("a", {})
    assert run.latest_checkpoint() is None and run.checkpoints() == []
    run.save_checkpoint(5, {"w": torch.ones(2), "step": 5, "lrs": [0.1]})
    run.save_checkpoint(12, {"w": torch.zeros(2), "step": 12})
    run.save_checkpoint(7, {"w": torch.zeros(1)}, tag="b")
    assert [s for s, _ in run.checkpoints()] == [5, 12]
    step, state = run.latest_checkpoint()
    assert step == 12 and torch.equal(state["w"], torch.zeros(2))
    assert run.latest_checkpoint("b")[0] == 7
    assert not list(run.dir.glob("checkpoints/*.tmp"))


def test_arrays_and_figures(store):
    run = store.create("a", {})
    run.log_array("inst/gram", torch.eye(3), step=4)
    run.log_array("plain", np.arange(3))
    assert np.array_equal(run.load_array("inst/gram", step=4), np.eye(3))
    assert run.load_array("plain").tolist() == [0, 1, 2]
    fig, axes = new_figure()
    axes[0, 0].plot([0, 1])
    path = run.save_figure(fig, "line")
    assert path == run.dir / "figures" / "line.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_errors_name_the_fix(store):
    store.create("a", {})
    with pytest.raises(RunExistsError, match="--resume"):
        store.create("a", {})
    with pytest.raises(RunNotFoundError, match="existing runs: a"):
        store.open("b")
    for bad in ("../x", "a\n", "<script>", ""):
        with pytest.raises(InvalidRunNameError, match="invalid run name"):
            store.create(bad, {})



def test_status_running_only_while_a_writer_holds_the_lock(store):
    run = store.create("a", {})
    reader = store.open("a")
    assert reader.status == "running" and reader.writer()["pid"] == os.getpid()
    with pytest.raises(RunLockedError, match="being written by pid"):
        store.open("a", lock=True)
    run.close()  # the writer is gone without finish(): killed, as far as readers can tell
    assert reader.status == "interrupted" and reader.writer() is None
    writer = store.open("a", lock=True)
    writer.interrupt("stopped by SIGTERM")
    assert writer.status == "interrupted" and writer.get_meta("error") == "stopped by SIGTERM"
    writer.mark_running()
    assert writer.status == "running" and writer.get_meta("error") is None


def test_stale_lock_is_taken_over_with_a_warning(store):
    store.create("a", {}).release_lock()
    (store.root / "a" / "lock").write_text('{"pid": 999999, "host": "h", "since": "t"}')
    with pytest.warns(UserWarning, match="pid 999999 on h, which stopped without releasing"):
        run = store.open("a", lock=True)
    assert run.writer()["pid"] == os.getpid()


def test_readonly_handle_refuses_writes(store):
    store.create("a", {"lr": 0.1}).close()
    ro = store.open("a", readonly=True)
    assert ro.config == {"lr": 0.1}
    for write in (lambda: ro.log(1, {"x": 1.0}), lambda: ro.set_meta(x=1),
                  lambda: ro.save_checkpoint(1, {}), lambda: ro.log_array("a", np.zeros(2)),
                  lambda: ro.truncate_after(0)):
        with pytest.raises(PermissionError, match="opened read-only.*only rank 0 writes"):
            write()
    with pytest.raises(PermissionError, match="cannot be locked"):
        ro.acquire_lock()


def test_folder_killed_before_its_config_was_written_is_not_a_run(store):
    d = store.root / "a"
    d.mkdir(parents=True)
    con = sqlite3.connect(d / "run.sqlite")
    con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    con.commit()
    con.close()
    assert not store.exists("a") and store.names() == []
    run = store.create("a", {"lr": 1})  # taken over
    assert store.exists("a") and run.config == {"lr": 1}


def test_corrupt_database_names_the_file(store):
    d = store.root / "a"
    d.mkdir(parents=True)
    (d / "run.sqlite").write_bytes(b"this is not a database" * 100)
    assert store.exists("a")  # listed, so that opening it reports the damage
    with pytest.raises(RunStoreError, match=f"{d / 'run.sqlite'} is not a readable run "
                                            "database.*move the run folder aside"):
        store.open("a")


def _fail_write(monkeypatch, code, after=0):
    """The checkpoint write hits ``code`` after ``after`` bytes (a partial temp file)."""
    import graddyn.train._store as store_module

    real = store_module.write_bytes

    def failing(path, data):
        real(path, bytes(data)[:after])
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(store_module, "write_bytes", failing)


@pytest.mark.parametrize("code, fix", [(errno.ENOSPC, "free space"),
                                       (errno.EROFS, "make the folder writable"),
                                       (errno.EIO, "check the disk")],
                         ids=["disk-full", "read-only", "io-error"])
def test_checkpoint_write_failure_names_the_path_and_leaves_no_temp(store, monkeypatch,
                                                                   code, fix):
    run = store.create("a", {})
    run.save_checkpoint(1, {"w": torch.ones(3)})
    _fail_write(monkeypatch, code, after=10)
    with pytest.raises(StorageError, match=fix) as info:
        run.save_checkpoint(2, {"w": torch.zeros(3)})
    assert info.value.errno == code
    assert str(run.dir / "checkpoints" / "step_00000002.pt") in str(info.value)
    assert [p.name for p in (run.dir / "checkpoints").iterdir()] == ["step_00000001.pt"]
    assert run.latest_checkpoint()[0] == 1


def test_full_database_names_the_file(store):
    run = store.create("a", {})
    run._db.execute("PRAGMA max_page_count = 8")  # SQLite's own "database or disk is full"
    with pytest.raises(StorageError, match=r"cannot write .*run\.sqlite: database or disk is "
                                           "full; free space") as info:
        for step in range(10_000):
            run.log(step, {f"m{i}": float(i) for i in range(20)})
    assert info.value.errno == errno.ENOSPC


def test_array_write_failure_names_the_path(store, monkeypatch):
    run = store.create("a", {})

    def read_only(path, arr):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(np, "save", read_only)
    with pytest.raises(StorageError, match=r"arrays/g\.npy: \[Errno 30\]"):
        run.log_array("g", np.zeros(2))
    assert not list((run.dir / "arrays").glob("*"))


def _damage(path, how, payload):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"hello world\n" * 20)  # fixed: random bytes fail in random ways
    else:  # a pickle that would run code
        path.write_bytes(payload())


@pytest.mark.parametrize("how, reason", [
    ("truncated", "cut short or not a torch checkpoint"),
    ("empty", "the file is empty"),
    ("garbage", "not a torch checkpoint"),
    ("payload", "refused: loading it as one could run code"),
])
def test_bad_checkpoint_falls_back_to_the_previous_one(store, code_payload, how, reason):
    run = store.create("a", {})
    for step in (3, 6, 9):
        run.save_checkpoint(step, {"w": torch.full((50,), float(step))})
    bad = run.dir / "checkpoints" / "step_00000009.pt"
    make_payload, marker = code_payload
    _damage(bad, how, make_payload)
    with pytest.warns(CheckpointWarning, match=f"{bad} cannot be loaded: .*{reason}.*previous"):
        step, state = run.latest_checkpoint()
    assert step == 6 and torch.equal(state["w"], torch.full((50,), 6.0))
    assert not marker.exists()
    with pytest.raises(CorruptCheckpointError, match=str(bad)):
        run.load_checkpoint(bad)


def test_no_intact_checkpoint_lists_every_file(store, tmp_path):
    run = store.create("a", {})
    run.save_checkpoint(1, {"w": torch.ones(2)})
    run.save_checkpoint(2, {"w": torch.ones(2)})
    for _, path in run.checkpoints():
        path.write_bytes(b"")
    with pytest.warns(CheckpointWarning), pytest.raises(
            CorruptCheckpointError, match="no intact checkpoint: .*step_00000002.*step_00000001"
            ".*Delete them to start the run over"):
        run.latest_checkpoint()


def test_checkpoint_that_is_not_a_dict_is_refused(store):
    run = store.create("a", {})
    path = run.save_checkpoint(1, {"w": torch.ones(1)})
    torch.save([1, 2], path)
    with pytest.raises(CorruptCheckpointError, match="holds a list, not the dict"):
        run.load_checkpoint(path)
    with pytest.raises(FileNotFoundError):  # a missing file is not "corrupt"
        run.load_checkpoint(path.with_name("step_00000007.pt"))


def test_recorded_nothing(store):
    run = store.create("a", {})
    assert run.recorded_nothing()
    run.log_array("x", np.zeros(1))
    assert not run.recorded_nothing()


def test_lock_that_cannot_be_written_is_a_storage_error(store, monkeypatch):
    from graddyn.train._lock import RunLock

    store.create("a", {}).close()

    def read_only(self):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(RunLock, "acquire", read_only)
    with pytest.raises(StorageError, match=r"cannot write .*a/lock: .*make the folder writable"):
        store.open("a", lock=True)
    with pytest.raises(StorageError, match=r"cannot write .*b/lock"):
        store.create("b", {})
