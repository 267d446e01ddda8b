"""Closed-form per-example gradient rules for Hugging Face ``transformers`` layers.

Imported by the rule registry the first time a module from ``transformers`` is looked up, so
``graddyn`` itself never imports ``transformers``.

- ``Conv1D`` (GPT-2, GPT-style models): y = x W + b with W of shape (in, out), the transpose
  of ``nn.Linear``'s: dW_n = sum_t x[n,t] (x) g[n,t] -> Outer(L = x, R = g).
"""

from __future__ import annotations

from transformers.pytorch_utils import Conv1D

from graddyn.pergrad._factors import Outer
from graddyn.pergrad._rules import RuleCall, Use, register_rule


@register_rule(Conv1D, batch="leading")
def conv1d_rule(m: Conv1D, call: RuleCall) -> list[Use]:
    """Per-example factors of HF ``Conv1D`` on x (N, *, in): weight (in, out) and bias."""
    g, x = call.grad, call.args[0]
    n = g.shape[0]
    d_in, d_out = m.weight.shape
    x = x.reshape(n, -1, d_in)  # (N, T, in)
    g = g.reshape(n, -1, d_out)  # (N, T, out)
    uses: list[Use] = []
    if "weight" in call.wanted:
        uses.append(("weight", Outer(x[:, None], g[:, None], d_in)))
    if "bias" in call.wanted and m.bias is not None:
        uses.append(("bias", g.sum(1)))
    return uses
