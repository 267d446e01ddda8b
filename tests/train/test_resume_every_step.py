"""Stop a short run at every step, at two moments of the step, resume it, and compare every
metric and the final weights with an uninterrupted run, bit for bit. float32 on purpose (the
engine's fused in-place gradient write rounds differently from a fresh product there), with
per-minibatch instruments measuring inside a window of steps, and batches of 20 (scaling by
1/20 rounds, so the order of scale and product shows; 1/16 would be exact)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from graddyn.instruments import BatchCoherence, GroupSplit
from graddyn.train import Event, OnEvent, Probes, Recording, RunStore, Trainer, at_end, every

STEPS = 10
WINDOW = (3, 7)  # steps whose training minibatch is measured


class Crash(Exception):
    """Stands in for a kill: the trainer object is dropped, the run folder kept."""


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 12, generator=g, dtype=torch.float32)
    y = torch.randint(0, 4, (96,), generator=g)
    return SimpleNamespace(train_x=x[:80], train_y=y[:80], test_x=x[80:], test_y=y[80:])


def _train(run, crash=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 4)).float()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    groups = torch.arange(80) % 3 == 0
    window = lambda s: WINDOW[0] <= s <= WINDOW[1]  # noqa: E731
    hooks = []
    if crash is not None:
        step, event = crash

        def stop(st):
            if st.step == step:
                raise Crash(f"stopped at step {step}")

        hooks.append(OnEvent(event, stop))
    tr = Trainer(
        model, opt, _data(), batch_size=20, seed=0, run=run, interventions=hooks, progress=False,
        probes=Probes(batch_instruments=[
            (BatchCoherence(), window), (GroupSplit(groups, 2, seed=0, cumulative=True), window)]),
        recording=Recording(eval=every(3) | at_end, checkpoint=every(2) | at_end))
    tr.fit(STEPS)
    return model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    # module scope runs before conftest's per-test float64 default: set it the same way
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        run = RunStore(tmp_path_factory.mktemp("ref")).create("ref", {})
        model = _train(run)
    finally:
        torch.set_default_dtype(old)
    return {n: run.history(n) for n in run.metric_names()}, model


# odd steps stop at AFTER_STEP (updated, nothing of the step recorded), even steps at
# BATCH_END (metrics logged, the step's checkpoint not yet written): both moments occur
# inside the measurement window; make fault kills a real process at four moments of a step
@pytest.mark.parametrize("step", range(1, STEPS))
def test_stop_at_every_step_then_resume_is_bit_for_bit(tmp_path, reference, step):
    ref_metrics, ref_model = reference
    event = Event.AFTER_STEP if step % 2 else Event.BATCH_END
    run = RunStore(tmp_path).create("cut", {})
    with pytest.raises(Crash):
        _train(run, crash=(step, event))
    model = _train(run)  # resumes from the newest checkpoint
    assert ref_metrics.keys() == set(run.metric_names())
    assert any(n.startswith("group_split/") for n in ref_metrics)
    for name, (steps, values) in ref_metrics.items():
        got_steps, got = run.history(name)
        assert got_steps.tolist() == steps.tolist(), name
        assert got.tobytes() == values.tobytes(), name
    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(p, q)
