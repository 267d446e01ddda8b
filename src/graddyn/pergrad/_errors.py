"""Exceptions and warnings of the per-example gradient engine; every message names the problem
and the fix."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class UnsupportedModuleError(TypeError):
    """A parameter needs the exact (slow) path and ``capture(..., fallback=False)`` forbids it.

    Example:
        >>> with graddyn.capture(model, fallback=False) as cap:   # doctest: +SKIP
        ...     cap.backward(losses)   # raises if e.g. an nn.LSTM has no closed-form rule
    """


class CaptureError(RuntimeError):
    """Misuse of :class:`graddyn.Capture` (wrong loss shape, nothing captured, twice, ...)."""


class ExactPathWarning(UserWarning):
    """Some parameters' per-example gradients come from the exact path: batched
    vector-Jacobian products of the recorded graph, about B times the backward of the layers
    involved. Issued once per model structure; register a rule to make them fast."""


def exact_path_message(reasons: dict[str, str], b: int) -> str:
    shown = "; ".join(f"'{k}' ({v})" for k, v in list(reasons.items())[:6])
    more = f"; and {len(reasons) - 6} more" if len(reasons) > 6 else ""
    return (f"graddyn.capture: per-example gradients of {shown}{more} come from the exact path "
            f"(batched vector-Jacobian products of the recorded graph: exact, but about B = {b} "
            "times the backward of the layers between these parameters and the nearest "
            "per-example tensors). To make a layer fast, register a closed-form rule with "
            "graddyn.register_rule(ModuleType, rule).")


def unsupported_message(reasons: dict[str, str]) -> str:
    shown = "; ".join(f"'{k}' ({v})" for k, v in list(reasons.items())[:6])
    return (
        f"graddyn.capture has no closed-form per-example rule for {shown}, and fallback=False "
        "forbids the exact path (batched vector-Jacobian products of the recorded graph). Fix: "
        "pass fallback=True (exact, slower for these parameters), register a rule with "
        "graddyn.register_rule(ModuleType, rule), or exclude these parameters with "
        "capture(model, params=[...])."
    )


def batchnorm_message(module_type: str, qualname: str) -> str:
    return (
        f"{module_type} at '{qualname or '<root module>'}' runs with batch statistics (training "
        "mode or track_running_stats=False): each example's output depends on every other "
        "example of the batch. Fix: either use eval-mode statistics, e.g. model.eval() (or only "
        "the BatchNorm modules: m.eval() for m in model.modules() if isinstance(m, "
        "nn.modules.batchnorm._BatchNorm)) before the forward pass inside graddyn.capture, or "
        "replace BatchNorm by GroupNorm/LayerNorm; or, to measure the gradient of each "
        "example's loss through the coupled batch statistics (what training with this batch "
        "does; slower for the layers below the BatchNorm), pass "
        "graddyn.capture(model, batchnorm='coupled')."
    )


def check_losses(losses: object, scale: float, mode: str) -> None:
    """What ``Capture.backward`` needs of its input: per-example losses (B,) (or the model
    output (B, *) for ``mode='output'``) from the captured graph, all finite, and a finite
    ``scale``; otherwise an error naming the problem and the fix."""
    if not isinstance(losses, Tensor):
        raise TypeError(f"backward() expects a tensor of per-example losses, got "
                        f"{type(losses).__name__}.")
    want = "(B,) per-example losses, e.g. F.cross_entropy(out, y, reduction='none')"
    if mode == "output":
        want = "the model output (B, *) for mode='output'"
    if losses.ndim == 0 or (mode == "loss" and losses.ndim != 1):
        raise CaptureError(f"losses has shape {tuple(losses.shape)}; expected {want}. "
                           "A reduced (mean/sum) loss mixes the examples: use "
                           "reduction='none' and pass scale=1/B for a mean.")
    if losses.grad_fn is None:
        raise CaptureError("losses were not built from the captured forward pass (they "
                           "have no autograd graph). Fix: compute them inside the with "
                           "block from the model output, with gradients enabled.")
    if not math.isfinite(float(scale)):
        raise CaptureError(f"scale={scale} is not finite. Fix: pass a finite scale, e.g. "
                           "1/B for the mean over the batch.")
    bad = ~torch.isfinite(losses.detach().reshape(losses.shape[0], -1)).all(1)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        raise CaptureError(f"losses of example(s) {idx[:10]}{' ...' if len(idx) > 10 else ''}"
                           " are not finite (NaN or inf): their per-example gradients "
                           "would be NaN and poison every Gram entry. Fix: drop or repair "
                           "those examples (e.g. check the inputs for NaN) before "
                           "backward().")
