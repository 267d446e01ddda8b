"""The winsorized mean from the engine's factored form, against the dense reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.pergrad.conftest import run_capture
from tests.pergrad.test_api import ce, cnn, mlp
from torch import nn

from graddyn.interventions._winsorized_mean import winsorized_mean
from graddyn.reference import DenseBatchGrads, per_example_grads


@pytest.fixture
def capture_grads():
    return run_capture


@pytest.fixture(params=["mlp", "cnn"])
def setup(request):
    if request.param == "mlp":
        return mlp(), torch.randn(6, 5), torch.randint(0, 3, (6,))
    return cnn(), torch.randn(6, 2, 4, 4), torch.randint(0, 3, (6,))


def test_winsorized_mean_matches_dense(setup, capture_grads):
    model, x, y = setup
    grads = capture_grads(model, x, y)
    dense = DenseBatchGrads(per_example_grads(model, ce, x, y), (x.shape[0],))
    want = dense.winsorized_mean(1)
    for budget in (1, 1 << 30):  # one row per chunk / everything at once
        got = winsorized_mean(grads, 1, memory_budget_bytes=budget)
        for k in want:
            torch.testing.assert_close(got[k], want[k])


def test_winsorized_mean_embedding_rows(capture_grads):
    model = nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(6, 2))
    x, y = torch.randint(0, 7, (5, 2)), torch.randint(0, 2, (5,))
    grads = capture_grads(model, x, y)
    want = DenseBatchGrads(per_example_grads(model, ce, x, y), (5,)).winsorized_mean(1)
    got = winsorized_mean(grads, 1, memory_budget_bytes=5 * 3 * 8 * 2)
    for k in want:
        torch.testing.assert_close(got[k], want[k])


@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("budget", [1, 1 << 30])
def test_winsorized_mean_sequences_and_tied_weights(capture_grads, c, budget):
    """Linear on (B, T, d) (bmm block path) and a tied embedding/head (two factors)."""
    from tests.pergrad.test_rules import TinyTransformer

    model = TinyTransformer(tied=True, padding_idx=None)
    x, y = torch.randint(0, 11, (7, 5)), torch.randint(0, 11, (7, 5))

    def seq_ce(out, t):
        return F.cross_entropy(out.transpose(1, 2), t, reduction="none").sum(1)

    grads = capture_grads(model, x, y, loss_fn=seq_ce)
    want = DenseBatchGrads(per_example_grads(model, seq_ce, x, y), (7,)).winsorized_mean(c)
    got = winsorized_mean(grads, c, memory_budget_bytes=budget)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)


def test_winsorized_mean_c_zero_is_the_mean_and_bad_budget(capture_grads):
    model, x, y = mlp(), torch.randn(6, 5), torch.randint(0, 3, (6,))
    grads = capture_grads(model, x, y)
    mean = {k: v / 6 for k, v in grads.sum().items()}
    got = winsorized_mean(grads, 0)
    for k in mean:
        torch.testing.assert_close(got[k], mean[k])
    with pytest.raises(ValueError, match="memory_budget_bytes must be > 0"):
        winsorized_mean(grads, 1, memory_budget_bytes=0)
    with pytest.raises(ValueError, match="c < B/2"):
        winsorized_mean(grads, 3)
