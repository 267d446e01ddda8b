"""The global-batch exchange (``pergrad._distributed``) without processes: each "rank" is a
capture of one share of the batch; packing, planning and merging them must give the
single-process BatchGrads of the whole batch. The same code under real gloo ranks:
``tests/distributed/test_global_batch.py``."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import graddyn
from graddyn.pergrad import BatchGrads, CaptureError
from graddyn.pergrad._distributed import (
    allreduce_bytes,
    describe,
    merge,
    pack,
    plan,
    unwrap,
    wire,
)


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def local_pgs(model, x, y, loss_fn=ce, **kw):
    with graddyn.capture(model, **kw) as cap:
        losses = loss_fn(model(x), y)
    return list(cap.backward(losses).per_param().values())


def simulate(model, shares, loss_fn=ce, **kw):
    """(merged BatchGrads, per-rank payload bytes, forms) of ``shares`` = [(x_r, y_r), ...]."""
    return merged([local_pgs(model, x, y, loss_fn, **kw) for x, y in shares])


def merged(ranks):
    """What ``gather_params`` does, with each rank's ParamGrads in ``ranks``, no processes."""
    metas = [describe(p, 1) for p in ranks]
    forms = plan(metas, ranks[0])
    got, sent = [], []
    for pgs, meta in zip(ranks, metas):
        keys = wire(forms, meta, pgs)
        tensors = pack(pgs, [k for k, _ in keys])
        for (_, shape), t in zip(keys, tensors):
            assert tuple(t.shape) == tuple(shape)
        got.append({k: t.clone() for (k, _), t in zip(keys, tensors)})  # as if received
        sent.append(sum(t.numel() * t.element_size() for t in tensors))
    out = merge(ranks[0], forms, [m["n"] for m in metas], got)
    return BatchGrads(out, (out[0].n,)), sent, forms


def assert_same(a, b):
    torch.testing.assert_close(a.gram(), b.gram(), rtol=0, atol=1e-10)
    torch.testing.assert_close(a.norms(), b.norms(), rtol=0, atol=1e-10)
    for k, v in b.sum().items():
        torch.testing.assert_close(a.sum()[k], v, rtol=0, atol=1e-10)
    for k, v in b.materialize().items():
        torch.testing.assert_close(a.materialize()[k], v, rtol=0, atol=1e-10)


def whole(model, x, y, loss_fn=ce, **kw):
    with graddyn.capture(model, **kw) as cap:
        losses = loss_fn(model(x), y)
    return cap.backward(losses)


def test_mlp_sends_factors_and_the_bias_once():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    got, sent, forms = simulate(model, [(x[:4], y[:4]), (x[4:], y[4:])])
    assert_same(got, whole(model, x, y))
    assert [f.dense for f in forms] == [False, True, False, True]
    assert [f.alias for f in forms][1::2] == [(0, "L", False), (2, "L", False)]
    # per example: left (out) + right (in) per layer; the biases travel inside the left factors
    assert sent == [4 * 8 * (5 + 6 + 3 + 5), 3 * 8 * (5 + 6 + 3 + 5)]


def test_cnn_sends_per_example_gradients_where_fewer_bytes():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    x, y = torch.randn(5, 2, 6, 6), torch.randint(0, 3, (5,))
    got, _, forms = simulate(model, [(x[:2], y[:2]), (x[2:], y[2:])])
    assert_same(got, whole(model, x, y))
    assert forms[0].dense  # 36 positions x (4 + 18) > 4 x 18 numbers per example


def test_sequences_of_different_lengths_are_padded_exactly():
    emb, lin = nn.Embedding(11, 4), nn.Linear(4, 3)

    def loss_fn(out, y):
        return out.square().sum((1, 2))

    model = nn.Sequential(emb, nn.Tanh(), lin)
    a, b = torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (2, 2))
    got, _, forms = simulate(model, [(a, None), (b, None)], loss_fn, strategy="ghost")
    assert not forms[0].dense and forms[0].slots == [True]
    ga, gb = whole(model, a, None, loss_fn), whole(model, b, None, loss_fn)
    want = torch.zeros(5, 5)
    want[:3, :3], want[3:, 3:], want[:3, 3:] = ga.gram(), gb.gram(), ga.cross_gram(gb)
    want[3:, :3] = want[:3, 3:].T
    torch.testing.assert_close(got.gram(), want, rtol=0, atol=1e-10)
    for k, v in ga.sum().items():
        torch.testing.assert_close(got.sum()[k], v + gb.sum()[k], rtol=0, atol=1e-10)


class Branch(nn.Module):
    """``b`` is used only when ``use_b``: ranks may differ in which layers their batch uses."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.use_b = nn.Linear(4, 3), nn.Linear(3, 3), True

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h) if self.use_b else h


def test_a_rank_without_a_use_contributes_zero_rows():
    model = Branch()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    ranks = [local_pgs(model, x[:3], y[:3])]
    model.use_b = False
    ranks.append(local_pgs(model, x[3:], y[3:]))
    both, _, _ = merged(ranks)
    model.use_b = True
    first = whole(model, x[:3], y[:3])
    model.use_b = False
    second = whole(model, x[3:], y[3:])
    norms = both.norms(per_layer=True)
    for name in ("a.weight", "a.bias"):
        torch.testing.assert_close(norms[name], torch.cat([first.norms(per_layer=True)[name],
                                                           second.norms(per_layer=True)[name]]))
    for name in ("b.weight", "b.bias"):
        assert norms[name][3:].eq(0).all()
        torch.testing.assert_close(norms[name][:3], first.norms(per_layer=True)[name])
        torch.testing.assert_close(both.sum()[name], first.sum()[name])


def test_ranks_that_disagree_on_what_they_captured_are_named():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    x, y = torch.randn(3, 4), torch.randint(0, 2, (3,))
    ranks = [local_pgs(model, x, y), local_pgs(model, x, y, params=["1"])]
    with pytest.raises(CaptureError, match="ranks captured different things.*rank 1 has"):
        plan([describe(p, 1) for p in ranks], ranks[0])


def test_process_group_is_checked():
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="must be a torch.distributed ProcessGroup"):
        graddyn.capture(model, process_group=True)


def test_ddp_model_is_unwrapped_and_allreduce_counted():
    model = nn.Linear(3, 2)
    assert unwrap(model) is model
    assert allreduce_bytes(list(model.parameters()), 2) == 8 * 8  # 8 float64, W = 2
    assert allreduce_bytes(list(model.parameters()), 1) == 0


@pytest.fixture
def world_of_one(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_uninitialised_group_is_named(world_of_one):
    group = world_of_one
    dist.destroy_process_group()
    try:
        with pytest.raises(CaptureError, match="torch.distributed is not initialised"):
            graddyn.capture(nn.Linear(3, 2), process_group=group)
    finally:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def test_a_group_of_one_gives_the_local_batch(world_of_one):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    x, y = torch.randn(4, 1, 4, 4), torch.randint(0, 3, (4,))
    with graddyn.capture(model, process_group=world_of_one) as cap:
        losses = ce(model(x), y)
    got = cap.backward(losses)
    assert_same(got, whole(model, x, y))
    assert got.exchange.world_size == 1 and got.exchange.sent == 0
    assert got.exchange.payload > 0 and got.exchange.buffer == got.exchange.payload
    assert torch.equal(cap.gather(y), y)
    with graddyn.capture(model, mode="output", process_group=world_of_one) as cap:
        out = model(x)
    ntk = cap.backward(out)
    assert ntk.batch_shape == (4, 3)
    torch.testing.assert_close(ntk.gram(), whole(model, x, None, lambda o, _: o,
                                                mode="output").gram())
