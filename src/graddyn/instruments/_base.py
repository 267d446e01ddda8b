"""The contract every instrument follows, so the trainer needs no special case for any one.

An instrument turns what the engine gives on a probe batch into numbers. Math lives in pure
functions (``gram -> coherence``); an ``Instrument`` subclass is a thin stateful wrapper with
declared state (torchmetrics' pattern): ``__init__`` declares each piece with ``add_state``
(its default and how two shards of data combine), and the subclass implements only
``update`` and ``compute``. ``reset``, ``state_dict`` / ``load_state_dict`` and ``merge`` come
from the declaration, so the same object works in ``graddyn.train`` and in anyone's loop::

    inst = Coherence()
    for x, y in loader:
        with graddyn.capture(model) as cap:
            losses = F.cross_entropy(model(x), y, reduction="none")
        inst.update(Probe(grads=cap.backward(losses), losses=losses.detach(), targets=y))
    inst.compute()   # {"alpha": ..., "m_coherence": ...}

A subclass names itself once, in its class statement (``class Coherence(Instrument,
name="coherence")``): that sets ``Coherence.name`` and files it in ``INSTRUMENTS``.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from graddyn._registry import Registry

Reduce = Literal["sum", "cat", "min", "max"] | Callable[[Any, Any], Any] | None
"""How a state combines over shards of the data (``merge``; a data-parallel sync): "sum"
(numbers, tensors, arrays; dicts key by key; None is empty), "cat" (lists joined in order),
"min" / "max", a function (mine, other) -> combined, or None: not combinable (``merge``
refuses the instrument)."""


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


def require_grads(probe: Probe, who: str) -> Any:
    """The probe's BatchGrads, or a clear error if the trainer did not run the engine."""
    if probe.grads is None:
        raise ValueError(
            f"{who} needs per-example gradients: pass Probe(grads=cap.backward(losses), ...)"
        )
    return probe.grads


def empty_error(who: str) -> RuntimeError:
    return RuntimeError(f"{who}.compute() called before any update(); call update(probe) first")


def _fresh(value: Any) -> Any:
    """An independent copy of a state value (defaults are never shared with the state)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if type(value) in (list, dict) and not value:  # the common empty default, without deepcopy
        return type(value)()
    return copy.deepcopy(value)


def _sum(a: Any, b: Any) -> Any:
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, dict):
        return {k: _sum(a.get(k), b.get(k)) for k in {**a, **b}}
    return a + b


_REDUCE: dict[str, Callable[[Any, Any], Any]] = {
    "sum": _sum, "cat": lambda a, b: list(a) + list(b), "min": min, "max": max,
}


# name -> Instrument subclass; ``graddyn list instruments`` prints it.
INSTRUMENTS: Registry[type[Instrument]] = Registry("instrument")


class Instrument(ABC):
    """Base class: accumulate with ``update``, read with ``compute``, start over with ``reset``.

    ``compute`` returns a flat dict of metric name -> float (or a small tensor for matrices /
    histograms); the trainer records every entry under ``f"{instrument.name}/{key}"``.
    ``needs_grads`` tells the trainer whether it must run the per-example engine for this probe.
    ``accumulates``: True for a measurement over the whole run (the trainer then never resets
    it between probes and checkpoints its ``state_dict``); False starts afresh at each probe.
    """

    name: ClassVar[str] = "instrument"
    needs_grads: ClassVar[bool] = True
    accumulates: bool = False

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
            INSTRUMENTS.register(name)(cls)

    def add_state(self, name: str, default: Any, reduce: Reduce = None) -> None:
        """Declare the state attribute ``name``: set to a copy of ``default`` now and by every
        ``reset``; saved by ``state_dict``; combined by ``reduce`` in ``merge``."""
        if isinstance(reduce, str) and reduce not in _REDUCE:
            raise ValueError(f"reduce must be one of {sorted(_REDUCE)}, a function or None, "
                             f"got {reduce!r}")
        self.__dict__.setdefault("_declared", {})[name] = (default, reduce)
        setattr(self, name, _fresh(default))

    @property
    def _states(self) -> dict[str, tuple[Any, Reduce]]:
        return self.__dict__.get("_declared", {})

    @abstractmethod
    def update(self, probe: Probe) -> None: ...

    @abstractmethod
    def compute(self) -> dict[str, Any]: ...

    def reset(self) -> None:
        """Every declared state back to its default."""
        for name, (default, _) in self._states.items():
            setattr(self, name, _fresh(default))

    def state_dict(self) -> dict[str, Any]:
        """A copy of every declared state (tensors and plain Python values for checkpoints)."""
        return {name: _fresh(getattr(self, name)) for name in self._states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self._states) - set(state)
        if missing:
            raise KeyError(f"{type(self).__name__} state lacks {sorted(missing)}; pass what "
                           "state_dict() returned")
        for name in self._states:
            setattr(self, name, _fresh(state[name]))

    @property
    def mergeable(self) -> bool:
        """Whether every declared state has a reduction (``merge`` works)."""
        return all(reduce is not None for _, reduce in self._states.values())

    def merge(self, other: Instrument) -> None:
        """Fold ``other`` (the same instrument updated on another shard of the data) into this
        one by each state's declared reduction: then ``compute`` covers both shards."""
        if not self.mergeable:
            raise TypeError(f"{type(self).__name__} declares state without a reduction; it "
                            "cannot be merged across shards")
        for name, (_, reduce) in self._states.items():
            fn = _REDUCE[reduce] if isinstance(reduce, str) else reduce
            assert fn is not None
            setattr(self, name, fn(getattr(self, name), getattr(other, name)))
