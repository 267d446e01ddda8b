"""graddyn's instruments inside the Hugging Face ``Trainer``: ``GraddynCallback``, a
``transformers.TrainerCallback``.

Name the instruments and their schedules; the callback measures them on the training batches
and puts the results in the Trainer's logs (``trainer.state.log_history`` and every
``report_to`` integration: TensorBoard, MLflow, W&B, ...)::

    trainer = Trainer(model=model, args=args, train_dataset=train)
    GraddynCallback([(Confusion(), every(10)), (GSNR(), every(50))]).attach(trainer)
    trainer.train()

How, without a second pass: on a measured step a forward hook on the model takes the
per-example losses from the model's output and the batch's ``labels`` (``per_example_loss``:
cross-entropy per example for classification, summed token losses per sequence for language
models, scaled so that their mean is the model's ``loss``; checked against it on every
measured step), runs the step's backward itself with one ``graddyn.capture`` backward (the
per-example gradients for the instruments and ``p.grad`` from the same factors, as
``graddyn.train.Trainer`` does for its ``batch_instruments``) and hands the Trainer a loss of
the same value whose backward has nothing left to do. Other steps are untouched.

Needs a model that computes its loss from ``labels`` (the Trainer's default path); fp16 with a
loss scaler, DeepSpeed, FSDP and several GPUs in one process are refused with the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graddyn.instruments._base import Instrument
from graddyn.integrations._meter import StepMeter
from graddyn.train._schedules import Schedule

try:
    from transformers import TrainerCallback
except ImportError:
    raise ImportError("graddyn.integrations.transformers needs Hugging Face transformers: pip "
                      "install transformers accelerate") from None

# (model, model output, the forward's keyword inputs) -> (B,) losses whose mean is the loss
PerExampleLoss = Callable[[nn.Module, Any, Mapping[str, Any]], Tensor]


def _causal(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def per_example_loss(model: nn.Module, outputs: Any, inputs: Mapping[str, Any]) -> Tensor:
    """The (B,) per-example losses behind a Hugging Face model's mean ``loss``:

    - sequence classification, logits (B, K), labels (B,): cross-entropy per example;
    - token level, logits (B, T, V), labels (B, T) (shifted by one for causal language
      models, ``-100`` ignored): example n's summed token losses times ``B / N``, N the
      number of counted tokens (``num_items_in_batch`` when the Trainer passes it), so the
      mean over the batch is the model's token-mean loss.
    """
    logits, labels = outputs["logits"], inputs.get("labels")
    if labels is None or not isinstance(logits, Tensor):
        raise ValueError("per_example_loss needs the model's logits and the batch's labels; "
                         "pass per_example_loss= for other models")
    if logits.ndim == 2 and labels.ndim == 1 and not labels.is_floating_point():
        return F.cross_entropy(logits.float(), labels, reduction="none")
    if logits.ndim == 3 and labels.ndim == 2:
        if _causal(model):
            logits, labels = logits[:, :-1], labels[:, 1:]
        b = labels.shape[0]
        tokens = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                 reduction="none", ignore_index=-100).view(b, -1)
        n = inputs.get("num_items_in_batch")
        n = (labels != -100).sum() if n is None else n
        return tokens.sum(1) * (b / n)
    raise ValueError(f"per_example_loss does not know logits {tuple(logits.shape)} with labels "
                     f"{tuple(labels.shape)} ({labels.dtype}); pass per_example_loss=")


class GraddynCallback(TrainerCallback):
    """Measure ``instruments`` (``(instrument, schedule)`` pairs; schedules of the optimizer
    step, as in ``graddyn.train``) on the training batches of a Hugging Face ``Trainer``.

    Results are logged at the step after the update they were measured before (names
    ``prefix + "<instrument>/<key>"``; a measured step forces a log there) and kept in
    ``history`` (``(step, name, value)``). ``per_example_loss(model, outputs, inputs)``
    gives the (B,) losses whose mean is the model's ``loss`` (default: ``per_example_loss``).
    Add it with ``attach(trainer)`` so the reporting integrations see its metrics.
    """

    def __init__(self, instruments: Sequence[tuple[Instrument, Schedule]], *,
                 per_example_loss: PerExampleLoss = per_example_loss,
                 prefix: str = "graddyn/") -> None:
        self.meter = StepMeter(instruments, prefix)
        self.per_example_loss = per_example_loss
        self._handles: list[Any] = []
        self._accumulate = 1
        self._pending: dict[str, float] = {}

    @property
    def history(self) -> list[tuple[int, str, float]]:
        return self.meter.history

    def attach(self, trainer: Any) -> GraddynCallback:
        """Add this callback to ``trainer`` ahead of its reporting integrations (which log
        what the callbacks before them have added to the logs) and return it."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    # ---- the fit ---------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module = None,
                       **kwargs: Any) -> None:
        refused = [(args.fp16, "fp16 scales the loss: use bf16=True or float32"),
                   (bool(args.deepspeed), "DeepSpeed runs its own backward"),
                   (bool(args.fsdp), "FSDP shards the parameters"),
                   (args.n_gpu > 1, "several GPUs in one process (DataParallel): launch with "
                                    "torchrun, one GPU per process")]
        for bad, why in refused:
            if bad:
                raise ValueError(f"GraddynCallback writes p.grad from its own backward and "
                                 f"cannot run here: {why}")
        self._accumulate = args.gradient_accumulation_steps

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.meter.close()

    # ---- each step -------------------------------------------------------------------------
    def on_step_begin(self, args: Any, state: Any, control: Any, model: nn.Module = None,
                      **kwargs: Any) -> None:
        step = state.global_step + 1
        if self.meter.begin_step(step, step == state.max_steps):
            self._arm(model)

    def on_substep_end(self, args: Any, state: Any, control: Any, model: nn.Module = None,
                       **kwargs: Any) -> None:
        if self.meter.due:  # the next micro-batch of an accumulated step
            self._arm(model)

    def _arm(self, model: nn.Module) -> None:
        self.meter.arm(model)
        if not self._handles:  # after the capture's own hooks, which record the forward
            self._handles = [model.register_forward_hook(self._backward, with_kwargs=True)]

    def _backward(self, model: nn.Module, args: Any, inputs: dict[str, Any], outputs: Any
                  ) -> Any:
        if not self.meter.armed:
            return outputs
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
        if loss is None:
            self.meter.armed = False
            raise ValueError("the model computed no loss: GraddynCallback needs the batch's "
                             "'labels' to reach the model (a compute_loss_func or label "
                             "smoothing takes them away)")
        losses = self.per_example_loss(model, outputs, inputs)
        if not torch.allclose(losses.detach().mean(), loss.detach().float(), rtol=1e-4,
                              atol=1e-6):
            self.meter.armed = False
            raise ValueError(f"the per-example losses average {float(losses.mean()):.6g}, "
                             f"not the model's loss {float(loss):.6g}: pass "
                             "per_example_loss= matching the model's loss")
        # the Trainer divides the loss by the accumulation steps unless the model normalised
        # it over all of them (num_items_in_batch)
        accumulate = 1 if inputs.get("num_items_in_batch") is not None else self._accumulate
        target = inputs.get("labels")
        self.meter.backward(losses, 1.0 / (len(losses) * accumulate), model=model,
                            outputs=outputs["logits"].detach(),
                            targets=target if target is not None and target.ndim == 1 else None)
        # the same value; its backward ends at a throw-away scalar leaf (nothing left to do)
        outputs["loss"] = loss.detach() + torch.zeros((), dtype=loss.dtype, device=loss.device,
                                                      requires_grad=True)
        return outputs

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._pending = self.meter.end_step()
        if self._pending:
            control.should_log = True  # logged at this step, next to the loss
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        if self._pending and logs is not None and "loss" in logs:
            logs.update(self._pending)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._pending)
            self._pending = {}
