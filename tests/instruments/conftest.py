"""Shared cases: a tiny float64 MLP and its reference per-example gradients."""

import pytest
import torch

from graddyn.instruments import Probe

from ._dense import dense_batch, random_batch, tiny_mlp


@pytest.fixture
def model():
    return tiny_mlp()


# (40,) corrupt mask over the rows 10 k + j of the batches below: every third row of a batch
CORRUPT = torch.arange(40) % 10 % 3 == 0


def groups(probe) -> torch.Tensor:
    """(B,) the probe's rows of ``CORRUPT``."""
    return CORRUPT[probe.indices]


@pytest.fixture
def batches(model):
    """Three probes of sizes 6, 8, 5 from the same model, with labels and training-set rows
    10 k + j (``CORRUPT`` marks every third row of each)."""
    out = []
    for k, b in enumerate((6, 8, 5)):
        x, y = random_batch(b, seed=k)
        out.append(Probe(grads=dense_batch(model, x, y), targets=y,
                         indices=torch.arange(b) + 10 * k, step=k))
    return out


def flat(probe) -> torch.Tensor:
    return probe.grads.flat


def pooled(probes) -> Probe:
    """One big probe made of all the batches' rows."""
    from ._dense import DenseGrads

    names = probes[0].grads.names
    per = {n: torch.cat([p.grads.per_example[n] for p in probes]) for n in names}
    return Probe(grads=DenseGrads(per), targets=torch.cat([p.targets for p in probes]),
                 indices=torch.cat([p.indices for p in probes]))
