"""What the Lightning and Hugging Face callbacks share: batch instruments measured on a
framework's training batches from the step's own backward, the way ``graddyn.train.Trainer``
measures its ``batch_instruments``.

One ``graddyn.capture`` of the model is opened at the first measured step and rearmed before
each measured forward (its hooks stay installed; between measurements it records nothing).
The framework's backward of a measured micro-batch is replaced by ``cap.backward(losses)``,
which gives the per-example gradients (for the instruments) and ``p.grad`` (written from the
same factors): one backward, as in graddyn's own loop. Steps are numbered as there: the
instruments due at optimizer step ``s`` (1-based) are measured at the weights before that
update (``Probe.step = s - 1``) and their results are logged at ``s``. With gradient
accumulation the micro-batches of one optimizer step stream into one measurement (``update``
per micro-batch, ``compute`` once), which equals one measurement of the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

from torch import Tensor, nn

from graddyn.instruments._base import Instrument, Probe
from graddyn.train._probes import ProbeRunner, compute_due, reset_due
from graddyn.train._schedules import Schedule


class StepMeter:
    """``(instrument, schedule)`` pairs measured on training batches; ``prefix`` is put before
    every metric name. ``history`` keeps ``(step, name, value)`` of every scalar result and
    ``arrays`` the latest array-valued ones (name -> (step, value))."""

    def __init__(self, instruments: Sequence[tuple[Instrument, Schedule]], prefix: str = ""
                 ) -> None:
        if not instruments:
            raise ValueError("no instruments to measure: pass (instrument, schedule) pairs, "
                             "e.g. instruments=[(Confusion(), every(10))]")
        self._runner = ProbeRunner(instruments)  # validates the pairs, says which are due
        self.prefix = prefix
        self.history: list[tuple[int, str, float]] = []
        self.arrays: dict[str, tuple[int, Any]] = {}
        self._stack = ExitStack()
        self._cap: Any = None
        self._due: list[Instrument] = []
        self._step = 0
        self.armed = False  # the next training forward is recorded
        self._measured = False  # at least one micro-batch of this step was measured

    @property
    def instruments(self) -> list[Instrument]:
        return [inst for inst, _ in self._runner.instruments]

    def begin_step(self, step: int, last: bool) -> bool:
        """Optimizer step ``step`` (1-based, the update about to happen) starts; whether
        any instrument is due at it. ``last``: it is the final step (``at_end`` fires)."""
        self._step, self._measured = step, False
        self._due = self._runner.due(step, last)
        reset_due(self._due)
        return bool(self._due)

    @property
    def due(self) -> bool:
        return bool(self._due)

    def arm(self, model: nn.Module) -> None:
        """Before the forward of a measured micro-batch: record it."""
        if self._cap is None:
            from graddyn.pergrad import capture

            self._cap = self._stack.enter_context(capture(model))
        else:
            self._cap.rearm()
        self.armed = True

    def backward(self, losses: Tensor, scale: float, **probe: Any) -> None:
        """The measured micro-batch's backward: ``p.grad += scale * sum_n grad losses[n]``
        (added, like ``backward()``) and every due instrument updated with the per-example
        gradients of the unscaled ``losses`` (B,). ``probe``: more ``Probe`` fields
        (``outputs``, ``targets``, ``indices``, ``model``)."""
        self.armed = False
        grads = self._cap.backward(losses)
        batch = Probe(grads=grads, losses=losses.detach(), step=self._step - 1, **probe)
        for inst in self._due:
            inst.update(batch)
        grads.write_grad(scale=scale)
        self._measured = True

    def end_step(self) -> dict[str, float]:
        """After the optimizer step: the scalar results keyed ``prefix + name/key`` (also
        added to ``history`` at this step), or {} when nothing was measured."""
        self.armed = False
        if not self._measured:
            return {}
        self._measured = False
        scalars, arrays = compute_due(self._due)
        self._due = []
        out = {self.prefix + k: v for k, v in scalars.items()}
        self.history.extend((self._step, k, v) for k, v in out.items())
        self.arrays.update({self.prefix + k: (self._step, v) for k, v in arrays.items()})
        return out

    def close(self) -> None:
        """Remove the capture's hooks (end of training, or an error)."""
        self.armed = False
        self._cap = None
        self._stack.close()
