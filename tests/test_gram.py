"""``graddyn._gram``: the cosines equal their definition, a zero gradient has cosine 0, and
``host_pairs`` is memoised and read-only."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import graddyn
from graddyn._gram import cosine_matrix, host_pairs, upper_flat


def test_cosines_match_the_definition_with_a_zero_gradient():
    g = torch.randn(6, 9, dtype=torch.float64)
    g[2] = 0.0
    got = cosine_matrix((g @ g.T).numpy())
    unit = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)  # the zero row stays zero
    np.testing.assert_allclose(got, (unit @ unit.T).numpy(), rtol=1e-12, atol=1e-15)
    assert (got[2] == 0).all() and got[0, 0] == 1.0
    flat = upper_flat(6)
    assert len(flat) == 15 and ((flat // 6) < (flat % 6)).all()


def test_batchgrads_host_pairs_are_memoised_and_read_only():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    with graddyn.capture(model) as cap:
        losses = F.cross_entropy(model(x), y, reduction="none")
    grads = cap.backward(losses)
    g1, c1 = host_pairs(grads)
    g2, _ = host_pairs(grads)
    assert g1 is g2 and not g1.flags.writeable and not c1.flags.writeable
    np.testing.assert_allclose(g1, grads.gram().numpy(), rtol=1e-12)
    np.testing.assert_allclose(c1, cosine_matrix(grads.gram().numpy()), rtol=1e-12, atol=1e-15)
