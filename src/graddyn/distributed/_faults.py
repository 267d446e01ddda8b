"""Fault detection: a dead or hung worker becomes a clear error on the survivors.

Two mechanisms work together:

1. The process group is created with a short ``timeout=`` (gloo and NCCL honour it), so a
   collective that waits for a worker that never arrives raises instead of hanging forever.
   A worker that is killed closes its sockets, so its peers usually fail even sooner.
2. A :class:`Heartbeat` thread in every worker writes ``"<beat>:<collectives>"`` to the
   rendezvous store (hosted by the ``torchrun`` agent or by :func:`launch`'s parent process, so
   it outlives any worker) every ``interval`` seconds. When a collective fails, the survivor
   reads the heartbeats twice, ``3 * interval`` apart: a rank whose beat did not advance is
   dead; a live rank that entered fewer collectives than this one is hung. The survivor raises
   :class:`WorkerFailureError` naming those ranks.

Cost: one small store write per worker per ``interval`` (0.5 s), nothing per step.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch.distributed as dist

_PREFIX = "graddyn/hb/"
_DOWN = "graddyn/down/"


class WorkerFailureError(RuntimeError):
    """A collective failed because another worker died or hung; ``failed_ranks`` names them."""

    def __init__(self, message: str, failed_ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.failed_ranks = failed_ranks


def _client(host: str, port: int, timeout_s: float) -> dist.Store:
    return dist.TCPStore(
        host, port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
    )


class Heartbeat:
    """Per-worker liveness beacon in the rendezvous store plus the post-failure diagnosis.

    >>> hb = Heartbeat("127.0.0.1", port, rank=0, world_size=2)  # doctest: +SKIP
    >>> hb.start(); ...; hb.stop()                                 # doctest: +SKIP
    """

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        interval: float = 0.5,
        store_factory: Callable[[], dist.Store] | None = None,
    ) -> None:
        self.host, self.port, self.rank, self.world_size = host, port, rank, world_size
        self.interval = interval
        self.collectives = 0  # incremented by the main thread when a collective starts
        self._factory = store_factory or (lambda: _client(host, port, 5.0))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="graddyn-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval + 1)

    def _beat(self) -> None:
        try:
            store = self._factory()
        except Exception:  # no store: diagnosis will say so; never kill the worker for it
            return
        beat = 0
        while not self._stop.is_set():
            beat += 1
            with contextlib.suppress(Exception):
                store.set(f"{_PREFIX}{self.rank}", f"{beat}:{self.collectives}")
            self._stop.wait(self.interval)

    def _read(self, store: dist.Store) -> dict[int, tuple[int, int] | None]:
        out: dict[int, tuple[int, int] | None] = {}
        for r in range(self.world_size):
            key = f"{_PREFIX}{r}"
            if not store.check([key]):
                out[r] = None
                continue
            beat, coll = store.get(key).decode().split(":")
            out[r] = (int(beat), int(coll))
        return out

    def diagnose(self, kind: str, cause: BaseException) -> WorkerFailureError:
        """Name the ranks that stopped (dead) or fell behind (hung) after ``cause``."""
        where = f"collective #{self.collectives} ({kind}) on rank {self.rank}"
        try:
            store = self._factory()
            store.set(f"{_DOWN}{self.rank}", "1")
            first = self._read(store)
            time.sleep(3 * self.interval)
            second = self._read(store)
            survivors = {r for r in range(self.world_size) if store.check([f"{_DOWN}{r}"])}
        except Exception as exc:
            return WorkerFailureError(
                f"{where} failed ({cause}) and the rendezvous store at {self.host}:{self.port} "
                f"is unreachable ({exc}): the process hosting it (rank 0 unless launched by "
                "torchrun or graddyn.distributed.launch) probably died; check its log",
                (),
            )
        dead = tuple(
            r for r in range(self.world_size)
            if r not in survivors and (second[r] is None or second[r] == first[r])
        )
        if dead:
            return WorkerFailureError(
                f"worker rank(s) {list(dead)} stopped (no heartbeat for "
                f"{3 * self.interval:.1f} s); {where} failed: {cause}. Check the log of rank(s) "
                f"{list(dead)}; restart the job: it resumes from its last checkpoint, if it "
                "saved one.",
                dead,
            )
        hung = tuple(
            r for r, v in second.items()
            if r not in survivors and v is not None and v[1] < self.collectives
        )
        if hung:
            return WorkerFailureError(
                f"worker rank(s) {list(hung)} are alive but never reached {where} "
                f"(hung or far slower); it failed: {cause}. Raise the process-group timeout if "
                "they are only slow.",
                hung,
            )
        others = sorted(survivors - {self.rank})
        first = f"rank(s) {others} failed first (see their errors); " if others else ""
        return WorkerFailureError(
            f"{where} failed but every rank still beats; {first}cause: {cause}. Raise the "
            "process-group timeout if a worker is merely slow.",
            (),
        )


_MONITOR: Heartbeat | None = None


def set_monitor(monitor: Heartbeat | None) -> None:
    """Install the process-wide heartbeat that :func:`guard` consults."""
    global _MONITOR
    _MONITOR = monitor


def get_monitor() -> Heartbeat | None:
    return _MONITOR


@contextlib.contextmanager
def guard(kind: str) -> Iterator[None]:
    """Run one collective; turn a backend error or timeout into :class:`WorkerFailureError`."""
    monitor = _MONITOR
    if monitor is not None:
        monitor.collectives += 1
    try:
        yield
    except WorkerFailureError:
        raise
    except RuntimeError as exc:  # DistBackendError / DistNetworkError subclass RuntimeError
        if monitor is None:
            raise WorkerFailureError(
                f"{kind} failed: {exc}. Start workers with graddyn.distributed.launch or "
                "init_from_env to get the failed rank named.",
                (),
            ) from exc
        raise monitor.diagnose(kind, exc) from exc
