"""The per-example gradient engine.

>>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
>>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
>>> with graddyn.capture(model) as cap:
...     losses = F.cross_entropy(model(x), y, reduction="none")   # (B,)
>>> grads = cap.backward(losses)               # one backward pass
>>> grads.norms().shape, grads.gram().shape, sorted(grads.sum())   # (B,), (B, B), names
(torch.Size([5]), torch.Size([5, 5]), ['0.bias', '0.weight', '2.bias', '2.weight'])

How it works (details in each module's docstring):

- ``_capture``: forward hooks record each call's inputs and outputs of modules that own
  captured parameters (and of their ancestors); ``Capture.backward`` runs ONE
  ``torch.autograd.grad(losses, outputs)``; row n of each output gradient is example n's.
- ``_rules_*``: closed forms per layer (Linear with any leading dims, Conv1d/2d via unfold,
  Embedding, LayerNorm/GroupNorm/eval BatchNorm affine, biases) give factored gradients
  ``sum_t L (x) R`` (``_factors.Outer``) or dense (N, *shape) tensors.
- ``_paramgrads`` / ``_cost``: per parameter, products use the ghost form
  ``sum_{t,s} (L.L')(R.R')`` or materialise, whichever the FLOP/memory model finds cheaper
  (``strategy=`` forces it). Reused/tied parameters sum their uses, cross terms included.
- ``_fallback``: any other module with parameters -> ``vmap(vjp(functional_call))`` on its
  recorded input and output gradient. A parameter whose module is never called on the batch
  (used functionally, e.g. ``nn.MultiheadAttention.out_proj``, or called on an unbatched
  tensor such as positions ``arange(T)``) is served by the fallback of the nearest ancestor.

- ``_graphcheck`` (``check=True``, default): before the backward, one walk of the autograd
  graph outside the planned calls; a captured parameter also used as a plain tensor there
  (``h @ self.emb.weight.T``) raises ``CaptureError`` instead of silently losing that share.
- ``_batchcheck`` (``check=True``): a module called on a tensor that is neither (a view of)
  the model's input nor carries a graph (e.g. ``pos(arange(T))``) is probed once with a
  second seed; an output whose rows are shared by all examples (first dim == B by chance) is
  served by the fallback of a batched ancestor instead of being misread row by row.
- ``BatchGrads`` memoises per-layer Grams (``norms()`` then reads their diagonal) and computes
  ``winsorized_mean`` as plain sum (free from the factors) + a correction from the c + 1
  extreme values per coordinate, over cache-sized blocks materialised into one buffer.

Assumptions: examples are independent (no batch statistics: BatchNorm in training mode is an
error), the batch dimension is first, and every captured parameter is used inside its
owning module's forward or inside an ancestor module (checked, see ``_graphcheck``).
"""

from ._batchgrads import BatchGrads
from ._capture import Capture, capture
from ._errors import CaptureError, UnsupportedModuleError

__all__ = ["BatchGrads", "Capture", "CaptureError", "UnsupportedModuleError", "capture"]
