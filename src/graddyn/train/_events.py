"""Where things happen in the loop: the ``Event`` enum, the batch and the loop ``State``.

Interventions and gradient transforms do not subclass the trainer; they say *where* they act
(an ``Event``) and get the ``State`` there (composer's pattern, without its size).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from graddyn.train._store import Run


class Event(str, Enum):
    """The points of ``Trainer.fit`` where interventions act. The loop, annotated::

        FIT_START           # state.step = 0, or the checkpoint's step when resuming
        (fresh start only: eval / probes / checkpoint at step 0 if their schedules fire)
        while state.step < max_steps:
            EPOCH_START     # a new permutation of the training set was just drawn
            for each (x, y, indices) of the epoch:        # (B, *input_shape), (B,), (B,)
                BATCH_START     # state.batch is set; state.losses is still the previous one
                zero_grad; state.losses = gradient(model, loss_fn, batch)   # fills p.grad
                AFTER_BACKWARD  # p.grad holds the batch gradient: gradient transforms act here
                optimizer.step(); lr_scheduler.step(); state.step += 1
                AFTER_STEP      # weights updated, e.g. stochastic optimum shifting every k steps
                log batch loss / eval / probes   (each on its own schedule of state.step)
                BATCH_END       # everything of this step is recorded
                EPOCH_END       (if this was the epoch's last batch; state.epoch += 1 after)
                checkpoint      (on its schedule of state.step; captures all of the above)
        FIT_END             # state.step == max_steps; the final checkpoint was written

    A killed and resumed run continues right after the last checkpoint, so an intervention
    sees exactly the same sequence of events as in an uninterrupted run (EPOCH_START of a
    partly done epoch is not fired again).
    """

    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    BATCH_START = "batch_start"
    AFTER_BACKWARD = "after_backward"
    AFTER_STEP = "after_step"
    BATCH_END = "batch_end"
    EPOCH_END = "epoch_end"
    FIT_END = "fit_end"


@dataclass
class Batch:
    """One minibatch: inputs ``x`` (B, *input_shape), targets ``y`` (B,), positions ``indices``
    (B,) in the training set (so instruments and gradient steps can look up per-example data)."""

    x: Tensor
    y: Tensor
    indices: Tensor


@dataclass
class State:
    """What the loop knows at an event; interventions may read and change it.

    step:      optimizer steps taken so far (0 before the first step).
    epoch:     completed passes over the training set.
    batch:     the current minibatch (None before the first).
    losses:    (B,) detached per-example losses of ``batch`` under the weights before the step.
    extra:     free space for interventions to keep notes between events (not checkpointed;
               keep resumable state in an intervention's own ``state_dict``).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    max_steps: int
    step: int = 0
    epoch: int = 0
    batch: Batch | None = None
    losses: Tensor | None = None
    run: Run | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Intervention(Protocol):
    """Something that changes training at an event (composer's ``Algorithm``).

    ``match`` is asked at every event; ``apply`` runs when it says yes. An intervention with
    state that must survive a resume also defines ``state_dict()`` / ``load_state_dict(d)``
    (tensors and plain containers only; they go into the checkpoint)."""

    def match(self, event: Event, state: State) -> bool: ...

    def apply(self, event: Event, state: State) -> None: ...


class OnEvent:
    """The common case as a one-liner: call ``fn(state)`` at ``event`` when ``schedule(step)``
    fires (every time if ``schedule`` is None).

    >>> sos = OnEvent(Event.AFTER_STEP, lambda st: None, every(10))  # doctest: +SKIP
    """

    def __init__(
        self,
        event: Event,
        fn: Callable[[State], None],
        schedule: Callable[[int], bool] | None = None,
    ) -> None:
        self.event, self.fn, self.schedule = event, fn, schedule

    def match(self, event: Event, state: State) -> bool:
        return event is self.event and (self.schedule is None or bool(self.schedule(state.step)))

    def apply(self, event: Event, state: State) -> None:
        self.fn(state)
