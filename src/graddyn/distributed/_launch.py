"""Starting process groups: under ``torchrun`` (env://) or as N local processes.

``torchrun --nproc-per-node 4 script.py`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` reads them (the same code works on
several machines with ``--nnodes``). :func:`launch` is the library/test entry: it hosts the
rendezvous store in the calling process, spawns ``world_size`` workers that join a gloo group
on 127.0.0.1, runs ``fn(ctx, *args)`` in each and returns the per-rank results.

>>> def work(ctx, x):                                   # in an importable .py file
...     return ctx.rank * x
>>> launch(work, 2, args=(10,))                          # doctest: +SKIP
[0, 10]
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import queue
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from graddyn.distributed._faults import Heartbeat, get_monitor, set_monitor

ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class DistContext:
    """Where this worker sits: global rank, world size, backend, device, timeout."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    timeout_s: float


_CONTEXT: DistContext | None = None


def current() -> DistContext | None:
    """The context set by :func:`init_from_env` / :func:`launch` in this process, if any."""
    return _CONTEXT


def in_torchrun() -> bool:
    """True when the torchrun/env:// variables are all set (we are one of several workers)."""
    return all(v in os.environ for v in ENV_VARS)


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    return backend


def _check_timeout(timeout_s: float) -> None:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds (how long a collective may wait for "
                         f"a missing worker); got {timeout_s!r}")


def _start(rank: int, world_size: int, local_rank: int, backend: str, timeout_s: float,
           host: str, port: int, store: dist.Store | None) -> DistContext:
    global _CONTEXT
    backend = _resolve_backend(backend)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kw: dict[str, Any] = {"store": store} if store is not None else {"init_method": "env://"}
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s), **kw)
    monitor = Heartbeat(host, port, rank, world_size)
    monitor.start()
    set_monitor(monitor)
    _CONTEXT = DistContext(rank, world_size, local_rank, backend, device, timeout_s)
    return _CONTEXT


def init_from_env(backend: str = "auto", timeout_s: float = 60.0) -> DistContext:
    """Join the process group described by torchrun's environment variables.

    ``backend``: "auto" (NCCL with CUDA, else gloo), "gloo" or "nccl". ``timeout_s`` bounds
    how long a collective waits for a dead or hung worker before the survivors raise.
    """
    _check_timeout(timeout_s)
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"missing environment variables {missing}: start the workers with "
            "`torchrun --nproc-per-node N ...`, or call graddyn.distributed.launch(fn, N)"
        )
    if _CONTEXT is not None:
        return _CONTEXT
    env = os.environ
    return _start(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                  backend, timeout_s, env["MASTER_ADDR"], int(env["MASTER_PORT"]), None)


def shutdown() -> None:
    """Stop the heartbeat and destroy the process group (idempotent)."""
    global _CONTEXT
    monitor = get_monitor()
    if monitor is not None:
        monitor.stop()
        set_monitor(None)
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = None


class LaunchError(RuntimeError):
    """Some workers of :func:`launch` failed; ``errors`` maps rank -> formatted error."""

    def __init__(self, errors: dict[int, str], results: dict[int, Any]) -> None:
        lines = [f"  rank {r}: {msg}" for r, msg in sorted(errors.items())]
        super().__init__(f"{len(errors)} worker(s) failed:\n" + "\n".join(lines))
        self.errors = errors
        self.results = results


def _fn_ref(fn: Callable[..., Any]) -> tuple[str, str, str | None]:
    module = sys.modules.get(fn.__module__)
    path = getattr(module, "__file__", None)
    if "<locals>" in fn.__qualname__ or (fn.__module__ == "__main__" and path is None):
        raise ValueError(
            f"launch needs a function that worker processes can import; {fn.__qualname__!r} is "
            "local or defined in a notebook/REPL: move it to module level in a .py file"
        )
    return fn.__module__, fn.__qualname__, path


def _resolve(ref: tuple[str, str, str | None]) -> Callable[..., Any]:
    name, qualname, path = ref
    try:
        module = importlib.import_module(name if name != "__main__" else "__mp_main__")
    except ImportError:  # e.g. pytest's importlib mode: load the defining file directly
        assert path is not None
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _child(rank: int, world_size: int, port: int, backend: str, timeout_s: float,
           ref: tuple[str, str, str | None], args: tuple, out: Any) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        fn = _resolve(ref)
        store = dist.TCPStore("127.0.0.1", port, is_master=False,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        ctx = _start(rank, world_size, rank, backend, timeout_s, "127.0.0.1", port, store)
        out.put((rank, "ok", pickle.dumps(fn(ctx, *args))))
    except BaseException as exc:  # report everything, including SystemExit
        out.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        shutdown()


def launch(fn: Callable[..., Any], world_size: int, args: tuple = (), *, backend: str = "gloo",
           timeout_s: float = 30.0, join_timeout_s: float | None = None,
           preload: Sequence[str] = ()) -> list[Any]:
    """Run ``fn(ctx, *args)`` in ``world_size`` fresh local processes joined in one group.

    The parent hosts the TCP rendezvous store on 127.0.0.1 (a free port), so the store and the
    heartbeats outlive any worker. Returns the results in rank order; raises
    :class:`LaunchError` listing each failed rank's error (a worker that died without
    reporting shows its exit code). ``fn`` must be importable (module level in a .py file).
    ``preload``: slow-to-import modules the workers need (e.g. the one defining ``fn``),
    imported once by the fork server instead of once per worker.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int (number of local worker "
                         f"processes); got {world_size!r}")
    _check_timeout(timeout_s)
    ref = _fn_ref(fn)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s))
    ctx = _mp_context(tuple(preload))
    out = ctx.Queue()
    # not daemonic, so a worker may start its own children (e.g. DataLoader workers)
    procs = [ctx.Process(target=_child,
                         args=(r, world_size, store.port, backend, timeout_s, ref, args, out))
             for r in range(world_size)]
    try:
        for p in procs:
            p.start()
        reports = _collect(procs, out, join_timeout_s)
    finally:  # interrupted (Ctrl-C) or done: leave no worker behind
        for p in procs:
            if p.is_alive():
                p.kill()
    del store  # keep the store alive until every worker reported
    results = {r: pickle.loads(v) for r, (kind, v) in reports.items() if kind == "ok"}
    errors = {r: v for r, (kind, v) in reports.items() if kind == "error"}
    if errors:
        raise LaunchError(errors, results)
    return [results[r] for r in range(world_size)]


_PRELOADED: set[str] = set()  # modules the running forkserver imported


def _mp_context(preload: tuple[str, ...]) -> Any:
    """forkserver with torch and ``preload`` imported once in the server; workers fork from it
    (much cheaper than a fresh interpreter importing torch); spawn where forkserver
    is unavailable. A launch asking for a module the running server lacks restarts it."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    import multiprocessing.forkserver as forkserver

    # torch._dynamo: torch.optim.Optimizer imports it on first construction (seconds)
    wanted = {"torch", "torch.distributed", "torch._dynamo", "graddyn.distributed", *preload}
    if not wanted <= _PRELOADED:
        stop = getattr(forkserver._forkserver, "_stop", None)
        if _PRELOADED and stop is not None:
            stop()
        _PRELOADED.update(wanted)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(sorted(_PRELOADED))
    return ctx


def _collect(procs: list, out: Any, join_timeout_s: float | None) -> dict[int, tuple[str, Any]]:
    deadline = None if join_timeout_s is None else time.monotonic() + join_timeout_s
    reports: dict[int, tuple[str, Any]] = {}
    while len(reports) < len(procs):
        try:
            rank, kind, value = out.get(timeout=0.2)
            reports[rank] = (kind, value)
            continue
        except queue.Empty:
            pass
        if all(not p.is_alive() for p in procs) and out.empty():
            break
        if deadline is not None and time.monotonic() > deadline:
            for r, p in enumerate(procs):
                if r not in reports:
                    p.kill()
                    reports[r] = ("error", f"no result within join_timeout_s={join_timeout_s}")
    for r, p in enumerate(procs):
        p.join(timeout=10)
        if r not in reports:
            reports[r] = ("error", f"exited with code {p.exitcode} before reporting "
                                   "(killed or crashed)")
    return reports
