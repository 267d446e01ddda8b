"""Helpers of the end-to-end fault scenarios in this folder (``make fault``): real processes
killed, interrupted, starved of disk. Each test module sets ``pytestmark = pytest.mark.fault``
(left out of ``make test``) and compares what survives with an uninterrupted run, bit for
bit."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GRADDYN_QUIET": "1"}


def graddyn(*args: str) -> list[str]:
    """The CLI as a subprocess command line."""
    return [sys.executable, "-m", "graddyn", *args]


def start(argv: list[str], log: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(argv, env={**ENV, **kw.pop("env", {})}, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"), **kw)  # noqa: SIM115


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 180,
             log: Path | None = None) -> None:
    """Poll ``predicate`` until true; fail if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) too early:\n"
                        + (log.read_text()[-3000:] if log else ""))
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting" + (f":\n{log.read_text()[-3000:]}" if log else ""))
        time.sleep(0.02)


def assert_same_metrics(run, ref, skip=()) -> None:
    names = [n for n in ref.metric_names() if not any(s in n for s in skip)]
    assert [n for n in run.metric_names() if not any(s in n for s in skip)] == names
    for name in names:
        (s1, v1), (s2, v2) = run.history(name), ref.history(name)
        assert s1.tolist() == s2.tolist(), name
        assert v1.tobytes() == v2.tobytes(), name
