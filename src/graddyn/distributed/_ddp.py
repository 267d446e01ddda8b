"""``DistributedDataParallel`` for experiments: ``--set ddp=true`` under ``torchrun``.

``torchrun --nproc-per-node N -m graddyn run NAME --set ddp=true ...`` starts N ranks that each
run the experiment; :func:`data_parallel` joins them in one group (gloo on CPU, NCCL with
CUDA), puts the model and the data on this rank's device and wraps the model. The
``Trainer`` then splits each global batch among the ranks and its batch instruments measure
the global batch (``graddyn.capture(process_group=...)``).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from graddyn.distributed._launch import in_torchrun, init_from_env


def data_parallel(model: nn.Module, data: Any = None, backend: str = "auto",
                  timeout_s: float = 60.0) -> tuple[DistributedDataParallel, Any]:
    """(model wrapped in DDP on this rank's device, ``data`` with its tensors moved there).

    Every rank must build the same model (seed first); DDP also broadcasts rank 0's weights.
    """
    if not in_torchrun():
        raise RuntimeError("ddp=true needs one process per rank: launch with `torchrun "
                           "--nproc-per-node N -m graddyn run NAME --set ddp=true ...`, or "
                           "drop ddp=true to train in this process")
    ctx = init_from_env(backend, timeout_s)
    model = model.to(ctx.device)
    cuda = ctx.device.type == "cuda"
    wrapped = DistributedDataParallel(model, device_ids=[ctx.device] if cuda else None)
    if data is not None:
        data = SimpleNamespace(**{k: v.to(ctx.device) if isinstance(v, Tensor) else v
                                  for k, v in vars(data).items()})
    return wrapped, data
