"""A real full disk and a real read-only disk under a running ``graddyn run``: a small tmpfs
holds the runs folder. The error names the file, nothing partial is left, the run reads as
interrupted, and once the disk is fixed ``--resume`` finishes it bit for bit. Needs root (to
mount); skipped otherwise."""

import os
import subprocess
from contextlib import contextmanager

import pytest

from graddyn.train import RunStore

from ._helpers import ENV, assert_same_metrics, graddyn, start, wait_for

pytestmark = pytest.mark.fault

ARGS = ["width=512", "steps=60", "checkpoint_every=5", "eval_every=5"]  # ~80 KB checkpoints


def _mount(path, *options):
    return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs",
                           str(path)], capture_output=True, text=True)


@contextmanager
def small_disk(path, size):
    path.mkdir()
    if os.geteuid() != 0 or _mount(path, f"size={size}").returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _remount(path, *options):
    done = subprocess.run(["mount", "-o", ",".join(["remount", *options]), str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _run(root, *extra):
    return subprocess.run(graddyn("run", "smoke", "--root", str(root), "--name", "r",
                                  "--quiet", *extra),
                          env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    assert _run(root, "--set", *ARGS).returncode == 0  # same process setup as the runs
    return RunStore(root).open("r")


def test_full_disk_names_the_file_and_the_run_resumes(tmp_path, reference):
    with small_disk(tmp_path / "disk", "400k") as root:
        failed = _run(root, "--set", *ARGS)
        assert failed.returncode == 1
        lines = failed.stderr.strip().splitlines()
        assert "StorageError: [Errno 28] cannot write " + str(root / "r") in lines[0]
        assert "free space on that disk" in lines[0]
        assert lines[1] == (f"graddyn run: resume with: graddyn run smoke --name r --root "
                            f"{root} --resume")
        assert not list(root.rglob("*.tmp"))
        run = RunStore(root).open("r")
        assert run.status == "interrupted"
        done = run.checkpoints()[-1][0]
        assert 0 < done < 60
        _remount(root, "size=16m")  # space freed
        resumed = _run(root, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert_same_metrics(RunStore(root).open("r"), reference)


def test_read_only_disk_names_the_file_and_the_run_resumes(tmp_path, reference):
    """Linux refuses to remount a filesystem read-only while a process writes to it, so the
    run is killed first and resumed on the read-only disk (a write failing mid-run with
    EROFS is tests/experiments/test_framework_faults.py's in-process case)."""
    with small_disk(tmp_path / "disk", "16m") as root:
        log = tmp_path / "stderr.txt"
        proc = start(graddyn("run", "smoke", "--root", str(root), "--name", "r", "--quiet",
                             "--set", *ARGS, "sleep=0.1"), log)
        wait_for(lambda: (root / "r/checkpoints/step_00000010.pt").is_file(), proc, log=log)
        proc.kill()
        proc.wait()
        _remount(root, "ro")
        refused = _run(root, "--resume")
        assert refused.returncode == 1
        assert (f"StorageError: [Errno 30] cannot write {root / 'r' / 'lock'}: [Errno 30] "
                "Read-only file system") in refused.stderr
        assert "make the folder writable" in refused.stderr
        _remount(root, "rw")
        assert RunStore(root).open("r").status == "interrupted"
        resumed = _run(root, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert_same_metrics(RunStore(root).open("r"), reference)
