import math

import pytest
import torch

from graddyn.instruments import INSTRUMENTS, LearnedAt, Probe, learned_at_steps


def probe(step, correct, idx):
    correct = torch.tensor(correct)
    y = torch.zeros(len(correct), dtype=torch.long)
    outputs = torch.stack([correct.double(), 1 - correct.double()], dim=1)  # argmax 0 = right
    return Probe(outputs=outputs, targets=y, indices=torch.tensor(idx), step=step)


def test_history_reference():
    hist = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    steps = torch.tensor([0, 10, 20, 30])
    assert learned_at_steps(hist, steps).tolist() == [10, 30, -1, 0]


def test_instrument_matches_history_reference():
    gen = torch.Generator().manual_seed(0)
    hist = torch.rand(7, 5, generator=gen) < 0.7
    steps = torch.tensor([1, 2, 4, 8, 16])
    groups = [True, False, True, False, False, False, True]
    inst = INSTRUMENTS.get("learned_at")(corrupt=torch.tensor(groups))
    assert inst.needs_grads is False
    for t in range(5):
        inst.update(probe(int(steps[t]), hist[:, t].tolist(), list(range(7))))
    ref = learned_at_steps(hist, steps)
    assert inst.learned_at() == dict(enumerate(ref.tolist()))
    got = inst.compute()
    g = torch.tensor(groups)
    assert got["frac_learned"] == pytest.approx(float((ref >= 0).double().mean()))
    assert got["frac_learned_corrupt"] == pytest.approx(float((ref[g] >= 0).double().mean()))
    learned_p = ref[~g][ref[~g] >= 0].double()
    if learned_p.numel():
        assert got["mean_step_pristine"] == pytest.approx(float(learned_p.mean()))
    assert got["num_seen"] == 7


def test_partial_batches_and_unseen_indices():
    inst = LearnedAt()
    inst.update(probe(0, [True, False], [5, 2]))
    inst.update(probe(1, [True], [2]))
    assert inst.learned_at() == {2: 1, 5: 0}
    out = inst.compute()
    assert out["num_seen"] == 2 and out["frac_learned"] == 1.0
    assert math.isnan(out["frac_learned_corrupt"])


def test_reset_empty_and_errors():
    inst = LearnedAt()
    with pytest.raises(RuntimeError, match="before any update"):
        inst.compute()
    with pytest.raises(ValueError, match="needs Probe"):
        inst.update(Probe(outputs=torch.zeros(1, 2)))
    inst.update(probe(0, [True], [0]))
    inst.reset()
    with pytest.raises(RuntimeError):
        inst.compute()
