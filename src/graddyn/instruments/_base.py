"""The contract every instrument follows, so the trainer needs no special case for any one.

An instrument turns what the engine gives on a probe batch into numbers. Math lives in pure
functions (``gram -> coherence``); an ``Instrument`` subclass is a thin stateful wrapper with
``update / compute / reset`` (torchmetrics' pattern), so the same object works in
``graddyn.train`` and in anyone's own loop::

    inst = Coherence()
    for x, y in loader:
        with graddyn.capture(model) as cap:
            losses = F.cross_entropy(model(x), y, reduction="none")
        inst.update(Probe(grads=cap.backward(losses), losses=losses.detach(), targets=y))
    inst.compute()   # {"alpha": ..., "m_coherence": ...}
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from graddyn._registry import Registry


@dataclass
class Probe:
    """What one probe batch offers an instrument. Fields an instrument does not need may be None.

    grads:   a ``graddyn.BatchGrads`` of the per-example losses of this batch (or any object with
             ``norms() / gram() / sum() / materialize()``).
    losses:  (B,) per-example losses, detached.
    outputs: (B, K) model outputs (logits), detached.
    targets: (B,) integer labels.
    indices: (B,) positions of the examples in the training set.
    step:    the optimizer step at which the probe was taken.
    model:   the model, for instruments that need it (curvature, spectrum).
    """

    grads: Any = None
    losses: torch.Tensor | None = None
    outputs: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    step: int = 0
    model: torch.nn.Module | None = None


class Instrument(ABC):
    """Base class: accumulate with ``update``, read with ``compute``, start over with ``reset``.

    ``compute`` returns a flat dict of metric name -> float (or a small tensor for matrices /
    histograms); the trainer records every entry under ``f"{instrument.name}/{key}"``.
    ``needs_grads`` tells the trainer whether it must run the per-example engine for this probe.
    """

    name: ClassVar[str] = "instrument"
    needs_grads: ClassVar[bool] = True

    @abstractmethod
    def update(self, probe: Probe) -> None: ...

    @abstractmethod
    def compute(self) -> dict[str, Any]: ...

    @abstractmethod
    def reset(self) -> None: ...


# name -> Instrument subclass; ``graddyn list instruments`` prints it.
INSTRUMENTS: Registry[type[Instrument]] = Registry("instrument")
