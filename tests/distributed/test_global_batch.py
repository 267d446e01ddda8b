"""Global-batch instruments under ``torchrun --nproc-per-node 2`` (gloo, float64): on every
rank, the Gram, norms, sum and each instrument of ``capture(ddp_model, process_group=...)``
equal one process's on the concatenated batch, and a DDP training run with batch
instruments follows single-process training on the global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import graddyn

from . import _global_worker as worker

pytestmark = pytest.mark.distributed

TOL = dict(rtol=0, atol=1e-10)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("global")
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2",
                           worker.__file__, str(out)], env=env, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_every_query_and_instrument_is_the_global_batch_s(ranks, name):
    model, x, y, groups = worker.case(name)
    with graddyn.capture(model) as cap:
        losses = F.cross_entropy(model(x), y, reduction="none")
    want = worker.summary(cap.backward(losses), losses.detach(), y, groups)
    for got in ranks:
        assert set(got[name]) == set(want)
        for key, value in want.items():
            torch.testing.assert_close(got[name][key], value, equal_nan=True, msg=key, **TOL)
    for key, value in ranks[0][name].items():  # identical on every rank
        assert torch.equal(value.nan_to_num(), ranks[1][name][key].nan_to_num()), key


def test_the_exchange_is_counted(ranks):
    for r in ranks:
        mlp = r["mlp/exchange"]
        assert mlp.world_size == 2 and mlp.collectives == 3
        # MLP: per example the left (out) and right (in) factors of each layer; biases free
        assert mlp.buffer == 4 * 8 * (8 + 6 + 4 + 8)
        assert mlp.sent == mlp.buffer + mlp.metadata
    assert ranks[0]["mlp/exchange"].payload == 4 * 8 * 26
    assert ranks[1]["mlp/exchange"].payload == 3 * 8 * 26


def test_a_global_batch_the_ranks_cannot_share_is_refused(ranks):
    for r in ranks:
        assert "batch_size=13 must be a multiple of 2" in r["odd_batch"]


def test_ddp_training_with_batch_instruments_follows_single_process(ranks):
    ref = worker.trainer(worker.train_model())
    ref.fit(8)
    names = {n for _, n, _ in ref.history}
    assert {"confusion/min_cosine", "group_split/f_p", "coherence/alpha"} <= names
    for r in ranks:
        got = r["train"]
        assert [(s, n) for s, n, _ in got["history"]] == [(s, n) for s, n, _ in ref.history]
        for (_, n, v), (_, _, w) in zip(got["history"], ref.history):
            assert v == pytest.approx(w, rel=1e-10, abs=1e-10, nan_ok=True), n
        for k, v in ref.model.state_dict().items():
            torch.testing.assert_close(got["weights"][k], v, **TOL)
