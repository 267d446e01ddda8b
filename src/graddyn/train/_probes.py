"""Running instruments on a probe set: the per-example backward runs once per probe batch and
its result is shared by every instrument that is due and ``needs_grads``.

No instrument is special here: the runner only uses the ``Instrument`` contract
(``needs_grads``, ``update / compute / reset``, ``accumulates``): an instrument that
accumulates over the whole run (such as "first step each example is learned") is never reset
between probes, and its ``state_dict`` is checkpointed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from graddyn._losses import LossFn, check_losses
from graddyn.instruments._base import Instrument, Probe
from graddyn.train._schedules import StepPredicate, fires

# (model, loss_fn, x (B, ...), y (B,)) -> (BatchGrads-like, losses (B,), outputs (B, ...))
ProbeBackward = Callable[[nn.Module, LossFn, Tensor, Tensor], tuple[Any, Tensor, Tensor]]


def capture_backward(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> tuple:
    """The default ``ProbeBackward``: one ``graddyn.capture`` backward pass, ``p.grad``
    untouched."""
    from graddyn.pergrad import capture

    with capture(model) as cap:
        outputs = model(x)
        losses = loss_fn(outputs, y)
        check_losses(losses, len(y))
    grads = cap.backward(losses)
    return grads, losses.detach(), outputs.detach()


def _as_metric(value: Any) -> float | None:
    """A float for scalars (Python, NumPy, 1-element tensors); None for real arrays."""
    if type(value) is float:  # most instrument results: no further checks
        return value
    if isinstance(value, Tensor):
        return float(value) if value.numel() == 1 else None
    if hasattr(value, "shape") and getattr(value, "size", 1) != 1:
        return None
    return float(value)


@dataclass(frozen=True)
class Probes:
    """What a ``Trainer`` measures. ``instruments``: ``(instrument, schedule)`` pairs on the
    probe set, ``size`` fixed training examples (all if fewer), ``batch_size`` per
    ``backward`` (per-example gradients; default ``graddyn.capture``). ``batch_instruments``:
    pairs on each *training* batch from the step's own backward (``MeasuredMean``: no second
    pass), at the weights before the update, logged at the step after it."""

    instruments: Sequence[tuple[Instrument, StepPredicate]] = ()
    batch_instruments: Sequence[tuple[Instrument, StepPredicate]] = ()
    size: int = 256
    batch_size: int | None = None
    backward: ProbeBackward = capture_backward


class ProbeRunner:
    """Evaluates due instruments on fixed training examples ``indices`` (P,), split into
    chunks of ``batch_size`` (one ``Probe`` = one backward pass each); without ``indices``
    it only validates the pairs and says which are due."""

    def __init__(
        self,
        instruments: Sequence[tuple[Instrument, StepPredicate]],
        indices: Tensor | None = None,
        batch_size: int | None = None,
        backward: ProbeBackward = capture_backward,
    ) -> None:
        for item in instruments:
            if not (isinstance(item, tuple) and len(item) == 2 and callable(item[1])):
                raise TypeError(
                    f"instruments must be (instrument, schedule) pairs, got {item!r}; "
                    "e.g. [(Coherence(), every(10))]"
                )
        self.instruments = list(instruments)
        # no indices: only the schedules are used (batch instruments, other loops' meters)
        indices = torch.empty(0, dtype=torch.long) if indices is None else indices
        self.chunks = list(torch.split(indices, batch_size or max(len(indices), 1)))
        self.backward = backward

    def due(self, step: int, last: bool) -> list[Instrument]:
        return [inst for inst, sched in self.instruments if fires(sched, step, last)]

    def run(
        self, step: int, last: bool, model: nn.Module, loss_fn: LossFn,
        x: Tensor, y: Tensor,
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """Probe at ``step``: returns (scalar metrics, array-valued results) keyed
        ``"<instrument.name>/<key>"``."""
        due = self.due(step, last)
        if not due:
            return {}, {}
        need_grads = any(inst.needs_grads for inst in due)
        with preserved_buffers(model):
            probes = (self._probe(step, model, loss_fn, x[idx], y[idx], idx, need_grads)
                      for idx in self.chunks)
            return measure(due, probes)

    def _probe(
        self, step: int, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor,
        idx: Tensor, need_grads: bool,
    ) -> Probe:
        grads = None
        if need_grads:
            grads, losses, outputs = self.backward(model, loss_fn, x, y)
        else:
            with torch.no_grad():
                outputs = model(x)
                losses = loss_fn(outputs, y)
        return Probe(
            grads=grads, losses=losses.detach(), outputs=outputs.detach(), targets=y,
            indices=idx, step=step, model=model,
        )

    def state_dicts(self) -> list[Any]:
        """The run-long instruments' states (None for the others: reset at every probe)."""
        return [inst.state_dict() if inst.accumulates else None for inst, _ in self.instruments]

    def load_state_dicts(self, states: list[Any]) -> None:
        for (inst, _), sd in zip(self.instruments, states):
            if sd is not None:
                inst.load_state_dict(sd)


def measure(due: Sequence[Instrument], probes: Iterable[Probe]
            ) -> tuple[dict[str, float], dict[str, Any]]:
    """Reset (unless run-long), update with every probe, compute: (scalar metrics,
    array-valued results) keyed ``"<instrument.name>/<key>"``."""
    reset_due(due)
    for probe in probes:
        for inst in due:
            inst.update(probe)
    return compute_due(due)


def reset_due(due: Sequence[Instrument]) -> None:
    """Start a measurement: reset every instrument that does not accumulate over the run."""
    for inst in due:
        if not inst.accumulates:
            inst.reset()


def compute_due(due: Sequence[Instrument]) -> tuple[dict[str, float], dict[str, Any]]:
    """(scalar metrics, array-valued results) of ``due``, keyed ``"<instrument.name>/<key>"``."""
    scalars: dict[str, float] = {}
    arrays: dict[str, Any] = {}
    for inst in due:
        for key, value in inst.compute().items():
            name = f"{inst.name}/{key}"
            as_float = _as_metric(value)
            if as_float is None:
                arrays[name] = value
            else:
                scalars[name] = as_float
    return scalars, arrays


@contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Measuring must not change training: a probe forward in train mode would update batch-norm
    running statistics (and ``num_batches_tracked``), so every buffer is restored afterwards."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def state_dict_of(obj: Any) -> Any:
    """``obj.state_dict()`` if it has one (gradient steps, interventions, instruments), else
    None."""
    fn = getattr(obj, "state_dict", None)
    return fn() if callable(fn) else None


def load_state_dict_into(obj: Any, state: Any) -> None:
    if state is not None and callable(getattr(obj, "load_state_dict", None)):
        obj.load_state_dict(state)
