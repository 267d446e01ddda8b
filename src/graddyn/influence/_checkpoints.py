"""Checkpoints for TracIn: ``(state_dict, lr)`` pairs, validated, or read from a ``Run``.

TracInCP (Pruthi et al., NeurIPS 2020) needs the weights w_t at a few steps t and the learning
rate eta_t in effect there. ``graddyn.train.Trainer`` saves both in every checkpoint (keys
``model`` and ``lr``), so :func:`checkpoints_from_run` is all a run needs.

>>> ckpts = checkpoints_from_run(run)              # doctest: +SKIP
>>> [lr for _, lr in ckpts]                        # doctest: +SKIP
[0.1, 0.1, 0.01]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:  # influence sits below train: only the type is needed
    from graddyn.train import Run

Checkpoint = tuple[Mapping[str, Tensor], float]


def check_checkpoints(checkpoints: Sequence[Any], model: nn.Module) -> list[Checkpoint]:
    """Validate ``[(state_dict, lr), ...]`` against ``model``; return it as a list.

    Raises ``ValueError`` naming the checkpoint and the fix for: an empty list, an entry that
    is not a pair, a learning rate that is not a positive finite number, or a state dict whose
    keys do not match ``model.state_dict()``.
    """
    ckpts = list(checkpoints)
    if not ckpts:
        raise ValueError("no checkpoints: pass a list of (state_dict, lr) pairs, e.g. "
                         "checkpoints_from_run(run) for a run trained with a "
                         "checkpoint schedule (Recording(checkpoint=...))")
    want = set(model.state_dict())
    out: list[Checkpoint] = []
    for i, item in enumerate(ckpts):
        if not (isinstance(item, (tuple, list)) and len(item) == 2
                and isinstance(item[0], Mapping)):
            raise ValueError(f"checkpoint {i} must be a (state_dict, lr) pair, got "
                             f"{type(item).__name__}; e.g. (model.state_dict(), 0.1)")
        state, lr = item
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (
                math.isfinite(lr) and lr > 0):
            raise ValueError(f"checkpoint {i} has learning rate {lr!r}; TracIn weights each "
                             "checkpoint by the positive learning rate in effect there (use "
                             "1.0 to weight checkpoints equally)")
        missing, extra = sorted(want - set(state)), sorted(set(state) - want)
        if missing or extra:
            raise ValueError(f"checkpoint {i} does not match the model: missing keys "
                             f"{missing[:5]}, unexpected keys {extra[:5]}; build the model "
                             "with the architecture that was trained")
        out.append((state, float(lr)))
    return out


def checkpoints_from_run(run: Run, tag: str = "", steps: Sequence[int] | None = None
                         ) -> list[Checkpoint]:
    """``[(model state_dict, lr), ...]`` of the checkpoints ``run`` saved under ``tag``.

    ``steps``: only these steps (default: every checkpoint, by step). Checkpoints are those of
    ``Trainer(recording=Recording(checkpoint=...))``; each must hold ``model`` and ``lr``.
    Cost: loads every selected file (``torch.load(weights_only=True)``).
    """
    found = dict(run.checkpoints(tag))
    if not found:
        where = f"tag {tag!r} of " if tag else ""
        raise ValueError(f"{where}run {run.name!r} has no checkpoints; train it with "
                         "Trainer(..., recording=Recording(checkpoint=every(n) | at_end))")
    if steps is None:
        steps = sorted(found)
    unknown = [s for s in steps if s not in found]
    if unknown:
        raise ValueError(f"run {run.name!r} has no checkpoint at steps {unknown}; available "
                         f"steps: {sorted(found)}")
    out: list[Checkpoint] = []
    for s in steps:
        state = run.load_checkpoint(found[s])
        if "model" not in state or "lr" not in state:
            raise ValueError(f"checkpoint at step {s} of run {run.name!r} lacks 'model' or "
                             "'lr'; save {'model': model.state_dict(), 'lr': lr} (as "
                             "Trainer.checkpoint_state does)")
        out.append((state["model"], float(state["lr"])))
    return out
