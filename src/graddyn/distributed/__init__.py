"""Distributed training on ``torch.distributed``: LSGD, multi-leader LSGD, EASGD, data-parallel.

Each worker process owns a model and its local optimizer; an algorithm replaces
``optimizer.step()`` and talks to the other workers with counted collectives (gloo on CPU,
NCCL on GPU):

- :class:`LSGD` (Teng et al., NeurIPS 2019): ``x <- x - eta g - pull (x - x_leader)`` every
  ``period`` steps, leader = lowest running-average loss over ``window`` steps.
- :class:`MultiLeaderLSGD`: groups from ``torch.distributed.new_group``; local leader pull
  every ``period`` and global leader pull (``global_pull``) every ``global_period`` steps.
- :class:`EASGD` (Zhang et al., NeurIPS 2015), synchronous, elastic strength ``elastic``.
- :class:`DataParallelSGD`: all-reduce mean of gradients every step (the baseline).
- :func:`data_parallel`: a model in ``DistributedDataParallel`` for the ``Trainer`` (its batch
  instruments then measure the global batch); experiments' ``--set ddp=true``.

Start workers with ``torchrun`` (call :func:`init_from_env`) or, from Python,
:func:`launch(fn, world_size) <launch>`. A dead or hung worker makes the survivors raise
:class:`WorkerFailureError` naming its rank within the process-group timeout.

>>> def worker(ctx):                      # module level in a .py file
...     model = torch.nn.Linear(4, 2)
...     algo = LSGD(torch.optim.SGD(model.parameters(), lr=0.1), pull=0.2, period=4)
...     loss = model(torch.randn(8, 4)).square().mean(); loss.backward(); algo.step(loss)
...     return algo.stats.bytes_sent
>>> launch(worker, 2)                     # doctest: +SKIP
"""

from graddyn.distributed._algorithms import (
    ALGORITHMS,
    EASGD,
    LSGD,
    DataParallelSGD,
    WorkerAlgorithm,
)
from graddyn.distributed._comm import Comm, CommStats
from graddyn.distributed._ddp import data_parallel
from graddyn.distributed._faults import WorkerFailureError
from graddyn.distributed._launch import (
    DistContext,
    LaunchError,
    current,
    in_torchrun,
    init_from_env,
    launch,
    shutdown,
)
from graddyn.distributed._leader import LossWindow, select_leader
from graddyn.distributed._multileader import MultiLeaderLSGD, make_groups
from graddyn.distributed._trainer import build_algorithm, shard_indices, train_worker

__all__ = [
    "ALGORITHMS", "Comm", "CommStats", "DataParallelSGD", "DistContext", "EASGD", "LSGD",
    "LaunchError", "LossWindow", "MultiLeaderLSGD", "WorkerAlgorithm", "WorkerFailureError",
    "build_algorithm", "current", "data_parallel", "in_torchrun", "init_from_env", "launch",
    "make_groups",
    "select_leader", "shard_indices", "shutdown", "train_worker",
]
