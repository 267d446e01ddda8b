"""The Trainer with a model in DistributedDataParallel (a group of one here; two ranks under
torchrun in ``tests/distributed/test_global_batch.py``) and with a read-only run (what ranks
other than 0 get)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from graddyn.instruments import Confusion
from graddyn.train import Probes, Recording, RunStore, Trainer, at_end, every

from .test_trainer import make_data, make_model


@pytest.fixture
def group_of_one(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def trainer(model, run=None, **kw):
    return Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5), make_data(), batch_size=6,
        run=run, progress=False, **kw, probes=Probes(batch_instruments=[(Confusion(), every(2))]),
        recording=Recording(checkpoint=every(3) | at_end))


def test_ddp_model_trains_as_the_plain_one_and_saves_plain_checkpoints(group_of_one, tmp_path):
    run = RunStore(tmp_path).create("ddp", {})
    ddp = trainer(DistributedDataParallel(make_model()), run)
    ddp.fit(5)
    plain = trainer(make_model())
    plain.fit(5)
    assert set(run.metric_names()) == {n for _, n, _ in plain.history}
    assert "confusion/min_cosine" in run.metric_names()
    for name in run.metric_names():
        steps, values = run.history(name)
        assert steps.tolist() == [s for s, n, _ in plain.history if n == name], name
        want = [v for _, n, v in plain.history if n == name]
        assert values.tolist() == pytest.approx(want, rel=1e-12), name
    state = run.latest_checkpoint()[1]["model"]
    assert set(state) == set(make_model().state_dict())  # no "module." prefix
    for k, v in plain.model.state_dict().items():
        torch.testing.assert_close(ddp.model.module.state_dict()[k], v, rtol=0, atol=1e-12)


def test_ddp_refuses_other_gradient_rules(group_of_one):
    def rule(model, loss_fn, batch):
        losses = loss_fn(model(batch.x), batch.y)
        losses.mean().backward()
        return losses.detach()

    with pytest.raises(ValueError, match="gradient must be the default MeanLoss"):
        Trainer(
            DistributedDataParallel(make_model()),
            torch.optim.SGD(make_model().parameters(),
                                                                      lr=0.1),
            make_data(), batch_size=6, gradient=rule)


def test_a_read_only_run_is_resumed_from_but_never_written(tmp_path):
    store = RunStore(tmp_path)
    run = store.create("r", {})
    trainer(make_model(), run).fit(3)
    before = {n: run.history(n) for n in run.metric_names()}
    follower = trainer(make_model(), store.open("r", readonly=True))
    follower.fit(5)  # resumes at step 3 from the checkpoint, logs locally only
    assert {n: run.history(n)[0].tolist() for n in run.metric_names()} == {
        n: s.tolist() for n, (s, _) in before.items()}
    assert [s for s, _ in run.checkpoints()] == [0, 3]
    assert min(s for s, _, _ in follower.history) == 4
    writer = trainer(make_model(), run)
    writer.fit(5)
    for p, q in zip(writer.model.parameters(), follower.model.parameters()):
        assert torch.equal(p, q)


def test_plain_model_needs_no_group():
    assert trainer(nn.Linear(3, 2))._group is None
