"""Book-keeping: where a query builds the per-example gradients anyway, one build serves the
query and ``.grad``. Which queries a step makes changes what is built (the previous batch of
the capture decides), never the numbers: every order of queries equals the per-example loop."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddyn
from graddyn.reference import per_example_grads

QUERIES = ["norms", "gram", "write", "sum"]


def _model(seed=0):
    torch.manual_seed(seed)  # convolutions of 4 and 16 input channels: both build paths
    return nn.Sequential(nn.Conv2d(4, 16, 3), nn.Tanh(), nn.Conv2d(16, 8, 3, padding=1),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).double()


@pytest.mark.parametrize("strategy", ["auto", "materialize"])
def test_any_order_of_queries_over_steps_equals_the_loop(strategy):
    model = _model()
    steps = list(itertools.permutations(QUERIES, 2)) + [("norms",), ("gram",), ("write",)]
    with graddyn.capture(model, strategy=strategy) as cap:
        for i, queries in enumerate(steps):
            if i:
                cap.rearm()
            g = torch.Generator().manual_seed(i)
            x = torch.randn(5, 4, 6, 6, generator=g, dtype=torch.float64)
            y = torch.randint(0, 3, (5,), generator=g)
            grads = cap.backward(F.cross_entropy(model(x), y, reduction="none"))
            ref = per_example_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"),
                                    x, y)
            flat = torch.cat([r.reshape(5, -1) for r in ref.values()], 1)
            for q in queries:
                if q == "norms":
                    torch.testing.assert_close(grads.norms(), flat.norm(dim=1))
                elif q == "gram":
                    torch.testing.assert_close(grads.gram(), flat @ flat.T)
                elif q == "sum":
                    for k, v in grads.sum(scale=0.5).items():
                        torch.testing.assert_close(v, 0.5 * ref[k].sum(0))
                else:
                    model.zero_grad(set_to_none=True)
                    grads.write_grad(scale=0.25)
                    for k, p in model.named_parameters():
                        torch.testing.assert_close(p.grad, 0.25 * ref[k].sum(0))


def test_two_rearmed_captures_of_one_model_each_go_by_their_own_last_batch():
    """A norms loop and a Gram loop taking turns on one model: each capture expects what its
    own previous batch asked, not what the other capture's did (else both would build the
    wrong way every step)."""
    model = _model()
    x = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    caps = {"norms": graddyn.capture(model), "gram": graddyn.capture(model)}
    try:
        for step in range(3):
            for ask, cap in caps.items():  # entered (step 0) or rearmed just before its forward
                cap.rearm() if step else cap.__enter__()
                grads = cap.backward(F.cross_entropy(model(x), y, reduction="none"))
                if step:  # the first batch of a capture expects a Gram (the default)
                    assert grads._wants_gram() == (ask == "gram")
                grads.gram() if ask == "gram" else grads.norms()
    finally:
        for cap in caps.values():
            cap.__exit__(None, None, None)
