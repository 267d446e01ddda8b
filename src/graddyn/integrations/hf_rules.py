"""Closed-form per-example gradient rules for Hugging Face ``transformers`` layers.

Imported by the rule registry the first time a module from ``transformers`` is looked up, so
``graddyn`` itself never imports ``transformers``.

- ``Conv1D`` (GPT-2, GPT-style models): y = x W + b with W of shape (in, out), the transpose
  of ``nn.Linear``'s: dW_n = sum_t x[n,t] (x) g[n,t] -> Outer(L = x, R = g).
- ``FalconLinear``: ``nn.Linear``'s map written as ``x @ W.T + b``: the Linear rule.

Hugging Face's own norm and embedding classes need no rule here: their ``F.layer_norm`` /
``F.embedding`` calls are recorded as functional rule calls, and their ``weight * x_hat``
(RMSNorm) by book-keeping (see ``graddyn.pergrad._functional`` and ``_local``).
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


def _register_linear_subclasses() -> None:
    """Subclasses of nn.Linear whose forward is the same map written by hand (Falcon's
    ``input @ self.weight.T + self.bias``): the Linear rule serves them."""
    from graddyn.pergrad._rules_linear import linear_rule

    try:
        from transformers.models.falcon.modeling_falcon import FalconLinear
    except ImportError:  # an older or newer transformers without it
        return
    register_rule(FalconLinear, linear_rule, batch="leading")


_register_linear_subclasses()
