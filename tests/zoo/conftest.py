"""The real-model suite: model code nobody here wrote, against the per-loss reference.

``assert_exact(model, forward)`` runs ``forward(model) -> losses`` twice from the same RNG seed
(so dropout draws the same masks): once plain, differentiating each ``losses[i]`` separately
(``graddyn.reference.per_loss_grads``), once under ``graddyn.capture``; Gram, norms,
materialised gradients and their sum must agree in float64. ``exact_path`` states which
parameters may take the exact (slow) path: None = any, a set of names = exactly those.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import graddyn
from graddyn.pergrad import ExactPathWarning
from graddyn.pergrad._capture import PLANS
from graddyn.reference import per_loss_grads


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _names_in(message: str, names: list[str]) -> set[str]:
    return {n for n in names if f"'{n}'" in message}


def run_captured(model, forward, seed=0, **kw):
    """(BatchGrads, names of parameters that took the exact path); the model's cached plans are
    dropped first, so every call analyses (and warns) afresh."""
    PLANS.pop(model, None)
    torch.manual_seed(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExactPathWarning)
        with graddyn.capture(model, **kw) as cap:
            losses = forward(model)
        grads = cap.backward(losses)
    names = [n for n, _ in model.named_parameters()]
    slow = set().union(*[_names_in(str(w.message), names) for w in caught
                         if issubclass(w.category, ExactPathWarning)])
    return grads, slow


def assert_exact(model, forward, seed=0, exact_path=None, strategies=("auto",), rtol=1e-9,
                 **kw):
    torch.manual_seed(seed)
    losses = forward(model)
    ref = per_loss_grads(model, losses, kw.get("params"))
    rows = losses.numel()
    flat = torch.cat([g.reshape(rows, -1) for g in ref.values()], 1).double()
    gram = flat @ flat.T
    scale = float(gram.abs().max()) or 1.0
    for s in strategies:
        grads, slow = run_captured(model, forward, seed, strategy=s, **kw)
        got = grads.gram().reshape(rows, rows).double()
        err = float((got - gram).abs().max()) / scale
        assert err <= rtol, f"gram off by {err:.2e} (relative to its max), strategy={s}"
        norms = grads.norms().reshape(rows).double()
        torch.testing.assert_close(norms, flat.norm(dim=1), rtol=rtol ** 0.5, atol=0,
                                   msg=f"norms, strategy={s}")
        mat, total = grads.materialize(), grads.sum()
        for k, g in ref.items():
            torch.testing.assert_close(mat[k].double(), g.double(), msg=f"materialize {k}, {s}")
            if losses.ndim == 1:
                torch.testing.assert_close(total[k].double(), g.sum(0).double(),
                                           msg=f"sum {k}, {s}")
        if exact_path is not None:
            assert slow == set(exact_path), (f"exact path for {sorted(slow)}, "
                                             f"not {sorted(exact_path)}")
    return grads


@pytest.fixture
def exact():
    return assert_exact
