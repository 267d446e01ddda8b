"""The Ray backend of sweeps: ``graddyn sweep ... --backend ray [--address HOST:PORT]``.

Each grid point is one Ray task (one CPU, no Ray retries, a fresh worker process per task:
``max_calls=1``) that runs the point exactly as a local worker does (``_sweep._run_point``),
writing its run under the sweep's ``--root``, which every node must see at the same path
(a shared filesystem). Without ``--address`` a local Ray cluster of ``workers`` CPUs is
started for the sweep and stopped after it; with one, the sweep joins that cluster and
leaves it running.

A task whose worker dies (killed, out of memory, its node lost) is reported by Ray as a
``RayError``; the sweep then marks the point's run ``interrupted`` and, like the local pool,
retries it from its last checkpoint (``_sweep.drive``). Ray is an optional extra:
``pip install 'graddyn[cluster]'``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from graddyn.experiments._sweep import Outcome, _run_point, lost_worker

INSTALL = "pip install 'graddyn[cluster]'"


def _task(experiment: str, point: list[str], root: str, run_name: str,
          log: Sequence[str] = ()) -> str | None:
    """Body of one Ray task: the point's error text or None."""
    import torch

    torch.set_num_threads(1)  # tasks share the node's cores
    return _run_point(experiment, point, root, run_name, log)


class RayTasks:
    """A :class:`graddyn.experiments._sweep.Pool` of Ray tasks (a context manager: it starts
    a local cluster if there is no ``address`` and stops what it started)."""

    def __init__(self, experiment: str, root: str, address: str | None, workers: int,
                 log: Sequence[str] = ()) -> None:
        try:
            import ray
        except ImportError:
            raise ImportError(f"--backend ray needs Ray: {INSTALL}") from None
        self.ray, self.experiment, self.root = ray, experiment, root
        self.address, self.workers, self.log = address, workers, list(log)
        self.started = False
        self.names: dict[Any, str] = {}  # object ref -> run name

    def __enter__(self) -> RayTasks:
        ray = self.ray
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address is None:
                options["num_cpus"] = self.workers
            ray.init(address=self.address, **options)
            self.started = True
        self.remote = ray.remote(num_cpus=1, max_retries=0, max_calls=1)(_task)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.ray.shutdown()

    def submit(self, point: list[str], run_name: str) -> Hashable:
        ref = self.remote.remote(self.experiment, point, self.root, run_name, self.log)
        self.names[ref] = run_name
        return ref

    def wait(self, handles: list[Hashable]) -> list[Outcome]:
        ready, _ = self.ray.wait(handles, num_returns=1)
        return [self._outcome(ref) for ref in ready]

    def stop(self, handles: list[Hashable]) -> list[Outcome]:
        for ref in handles:
            self.ray.cancel(ref)  # KeyboardInterrupt in the task: its run is interrupted
        return [self._outcome(ref) for ref in handles]

    def _outcome(self, ref: Any) -> Outcome:
        name = self.names.pop(ref)
        try:
            return ref, self.ray.get(ref), False
        except self.ray.exceptions.TaskCancelledError:
            return ref, "interrupted: the sweep was stopped", False
        except self.ray.exceptions.RayTaskError as err:  # e.g. KeyboardInterrupt in the task
            return ref, f"{type(err.cause).__name__}: {err.cause}", False
        except self.ray.exceptions.RayError as err:  # the worker (or its node) died
            why = f"Ray worker died before it reported ({type(err).__name__})"
            return ref, lost_worker(name, why, self.root), True
