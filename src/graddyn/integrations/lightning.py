"""graddyn's instruments inside PyTorch Lightning: ``GraddynCallback``, a
``lightning.pytorch.Callback`` (``pytorch_lightning`` works too).

The ``training_step`` returns the per-example losses next to their mean, and the callback
measures the named instruments on the training batch from the step's own backward, logging
them to every logger of the ``Trainer`` (TensorBoard, CSV, MLflow, W&B, ...)::

    class Net(L.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            losses = F.cross_entropy(self(x), y, reduction="none")     # (B,)
            return {"loss": losses.mean(), "losses": losses, "targets": y}

    cb = GraddynCallback([(Confusion(), every(10)), (Coherence(), every(1))])
    L.Trainer(max_steps=100, callbacks=[cb]).fit(Net(), loader)

On a measured step the callback replaces the module's ``backward`` (Lightning's hook for a
custom backward) by one ``graddyn.capture`` backward that gives the per-example gradients
and ``p.grad`` from the same factors, as ``graddyn.train.Trainer`` does for its
``batch_instruments``: no second pass. Other steps run Lightning's own backward untouched.
The values equal graddyn's own loop on the same batches and weights. Optional keys of the
``training_step`` output fill more of the ``Probe``: ``outputs`` (B, K) logits, ``targets``
(B,), ``indices`` (B,) positions in the training set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from graddyn.instruments._base import Instrument
from graddyn.integrations._meter import StepMeter
from graddyn.train._schedules import Schedule

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning import Callback
    except ImportError:
        raise ImportError(
            "graddyn.integrations.lightning needs PyTorch Lightning: pip install "
            "'graddyn[lightning]' (or pip install lightning)") from None

PROBE_KEYS = ("outputs", "targets", "indices")


class GraddynCallback(Callback):
    """Measure ``instruments`` (``(instrument, schedule)`` pairs; schedules of the optimizer
    step, as in ``graddyn.train``) on the training batches of a Lightning ``Trainer``.

    Results go to ``trainer.loggers`` at the step after the update they were measured before
    (names ``prefix + "<instrument>/<key>"``) and to ``history`` (``(step, name, value)``).
    ``training_step`` must return ``{"loss": losses.mean(), "losses": losses, ...}`` with the
    (B,) per-example losses. Gradient accumulation is supported (the micro-batches of a step
    form one measurement); a precision plugin with a loss scaler (``precision="16-mixed"``)
    and manual optimization are not.
    """

    def __init__(self, instruments: Sequence[tuple[Instrument, Schedule]], *,
                 prefix: str = "graddyn/") -> None:
        super().__init__()
        self.meter = StepMeter(instruments, prefix)
        # (object, attribute, previous instance value, whether there was one)
        self._restore: list[tuple[Any, str, Any, bool]] = []
        self._out: Mapping[str, Any] | None = None  # training_step output of a measured batch
        self._trainer: Any = None
        self._module: Any = None

    @property
    def history(self) -> list[tuple[int, str, float]]:
        return self.meter.history

    # ---- the fit ---------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError("GraddynCallback measures from Lightning's automatic optimization "
                             "backward; with automatic_optimization=False call graddyn."
                             "train.measured_backward in your training_step instead")
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError("GraddynCallback writes p.grad itself and cannot apply a loss "
                             "scaler: use precision='bf16-mixed' or '32-true' instead of "
                             f"{trainer.precision!r}")
        self._trainer, self._module = trainer, pl_module
        self._wrap(pl_module, "training_step", self._training_step)
        self._wrap(pl_module, "backward", self._backward)

    def _wrap(self, obj: Any, name: str, make: Callable[[Callable], Callable]) -> None:
        had = name in vars(obj)
        self._restore.append((obj, name, vars(obj)[name] if had else None, had))
        setattr(obj, name, make(getattr(obj, name)))

    def _unwrap(self) -> None:
        while self._restore:
            obj, name, old, had = self._restore.pop()
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)
        self.meter.close()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._unwrap()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._unwrap()

    # ---- each batch ------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:  # first micro-batch of a step
            step = trainer.global_step + 1
            self.meter.begin_step(step, step == _total_steps(trainer))
        if self.meter.due:
            self.meter.arm(pl_module)

    def _training_step(self, step_fn: Callable) -> Callable:
        def training_step(*args: Any, **kwargs: Any) -> Any:
            out = step_fn(*args, **kwargs)
            if self.meter.armed:
                self._out = _check_output(out)
            return out
        return training_step

    def _backward(self, backward_fn: Callable) -> Callable:
        def backward(loss: Tensor, *args: Any, **kwargs: Any) -> None:
            out, self._out = self._out, None
            if out is None or not self.meter.armed:
                return backward_fn(loss, *args, **kwargs)
            normalize = self._trainer.accumulate_grad_batches
            if not torch.equal(loss.detach(), out["loss"].detach() / normalize):
                raise ValueError("the loss Lightning back-propagates is not training_step's "
                                 "'loss' / accumulate_grad_batches (did a plugin rescale it?); "
                                 "GraddynCallback cannot measure from this backward")
            losses = out["losses"]
            probe = {k: out[k].detach() for k in PROBE_KEYS if k in out}
            self.meter.backward(losses, 1.0 / (len(losses) * normalize), model=self._module,
                                **probe)
        return backward

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step < self.meter._step:
            return  # accumulating: the optimizer step has not happened yet
        metrics = self.meter.end_step()
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)


def _total_steps(trainer: Any) -> int | None:
    """The number of optimizer steps of the fit (``at_end`` fires at the last)."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    total = trainer.estimated_stepping_batches
    return int(total) if total != float("inf") else None


def _check_output(out: Any) -> Mapping[str, Any]:
    """training_step's output on a measured step: a dict with (B,) ``losses`` whose mean is
    ``loss``."""
    losses = out.get("losses") if isinstance(out, Mapping) else None
    if losses is None:
        raise ValueError(
            "GraddynCallback needs the per-example losses: return {'loss': losses.mean(), "
            "'losses': losses} from training_step, with losses = F.cross_entropy(logits, y, "
            "reduction='none') (shape (B,))")
    if not isinstance(losses, Tensor) or losses.ndim != 1:
        raise ValueError(f"training_step's 'losses' must be a (B,) tensor of per-example "
                         f"losses, got {getattr(losses, 'shape', type(losses).__name__)}")
    if not torch.allclose(out["loss"].detach(), losses.detach().mean()):
        raise ValueError("training_step's 'loss' must be losses.mean() (got "
                         f"{float(out['loss']):.6g} vs mean {float(losses.mean()):.6g}); add "
                         "other terms to the per-example losses instead")
    return out
