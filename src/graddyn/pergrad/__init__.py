"""The per-example gradient engine.

>>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
>>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
>>> with graddyn.capture(model) as cap:
...     losses = F.cross_entropy(model(x), y, reduction="none")   # (B,)
>>> grads = cap.backward(losses)               # one backward pass
>>> grads.norms().shape, grads.gram().shape, sorted(grads.sum())   # (B,), (B, B), names
(torch.Size([5]), torch.Size([5, 5]), ['0.bias', '0.weight', '2.bias', '2.weight'])

How it works (details in each module's docstring):

- ``_record``: forward hooks record each call of the modules that own captured parameters
  (and of their ancestors): inputs, outputs, and the outputs' gradient edges.
- ``_walk`` / ``_plan`` / ``_layout``: once per model structure, a walk of the autograd graph
  and a two-pass layout check decide where the examples lie in every recorded tensor (never assumed:
  any layout, shared positions, coupling), which calls a closed-form rule serves, and which
  parameter uses need the exact path.
- ``_capture``: ONE ``torch.autograd.grad(losses, outputs)``; row n of each output gradient,
  in its layout, is example n's own.
- ``_rules_*`` (registry ``_rules``, public ``register_rule``): closed forms per layer
  (Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, Embedding, EmbeddingBag, LayerNorm, RMSNorm,
  GroupNorm, InstanceNorm, BatchNorm, PReLU; Hugging Face's Conv1D when ``transformers`` is
  used) give factored gradients ``sum_t L (x) R`` (``_factors.Outer``) or dense (N, *shape).
- ``_paramgrads`` / ``_cost``: per parameter, products use the ghost form or materialise,
  whichever the FLOP/memory model finds cheaper (``strategy=`` forces it). Reused/tied
  parameters sum their uses, cross terms included.
- ``_local``: the exact path for everything else: batched vector-Jacobian products of the
  recorded graph from the nearest per-example tensors (dropout keeps its masks, RNNs their
  kernels, coupled examples their coupling); slower, never wrong.
- ``BatchGrads`` memoises per-layer Grams (``norms()`` then reads their diagonal).
"""

from ._batchgrads import BatchGrads
from ._capture import Capture, capture
from ._errors import CaptureError, ExactPathWarning, UnsupportedModuleError
from ._factors import Outer
from ._rules import RuleCall, register_rule

__all__ = ["BatchGrads", "Capture", "CaptureError", "ExactPathWarning", "Outer", "RuleCall",
           "UnsupportedModuleError", "capture", "register_rule"]
