"""The run lock: one writer at a time, a dead writer's lock taken over and named."""

import errno
import fcntl
import json
import os

import pytest

from graddyn.train._lock import RunLock, RunLockedError


def test_second_writer_gets_an_error_naming_the_holder(tmp_path):
    path = tmp_path / "r" / "lock"
    path.parent.mkdir()
    first, second = RunLock(path), RunLock(path)
    assert first.acquire() is None and first.held and first.holder()["pid"] == os.getpid()
    with pytest.raises(RunLockedError, match=f"being written by pid {os.getpid()} on "):
        second.acquire()
    assert second.holder()["pid"] == os.getpid() and not second.held
    first.release()
    assert second.holder() is None and path.read_text() == ""  # a clean stop empties it
    assert second.acquire() is None
    second.release()
    second.release()  # idempotent


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    path = tmp_path / "lock"
    dead = {"pid": 999999, "host": "elsewhere", "since": "2024-01-01T00:00:00+00:00"}
    path.write_text(json.dumps(dead))  # what a SIGKILLed holder leaves: content, no flock
    lock = RunLock(path)
    assert lock.holder() is None
    assert lock.acquire() == dead
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


def test_torn_holder_record_still_counts_as_stale(tmp_path):
    path = tmp_path / "lock"
    path.write_text('{"pid": 12')
    lock = RunLock(path)
    assert lock.acquire() == {"pid": "?", "host": "?", "since": "?"}
    lock.release()


@pytest.mark.parametrize("code, exc, msg", [
    (errno.ENOLCK, RunLockedError, "does not support file locks.*local disk"),
    (errno.EBADF, OSError, "Bad file descriptor"),
], ids=["no-locks-on-this-filesystem", "other-errors-propagate"])
def test_lock_errors(tmp_path, monkeypatch, code, exc, msg):
    def flock(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(exc, match=msg):
        RunLock(tmp_path / "lock").acquire()
