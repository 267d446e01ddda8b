"""Contract checks generated from the registry: every instrument of this family is
deterministic, resets, and refuses compute() before update()."""

import pytest
import torch

from graddyn.instruments import INSTRUMENTS

from .conftest import CORRUPT

MINE = ["coherence", "batch_coherence", "confusion", "stiffness", "gsnr", "group_split",
        "learned_at"]


@pytest.mark.parametrize("name", MINE)
def test_contract(name, batches):
    cls = INSTRUMENTS.get(name)
    for p in batches:
        p.outputs = torch.randn(len(p.targets), 3, generator=torch.Generator().manual_seed(p.step))
        p.indices = torch.arange(len(p.targets)) + 10 * p.step
    kw = {"corrupt": CORRUPT} if name == "group_split" else {}
    a, b = cls(**kw), cls(**kw)
    with pytest.raises(RuntimeError, match="update"):
        a.compute()
    for p in batches:
        a.update(p)
        b.update(p)
    ra, rb = a.compute(), b.compute()
    assert ra.keys() == rb.keys()
    for k in ra:
        va, vb = ra[k], rb[k]
        if isinstance(va, torch.Tensor):
            assert torch.equal(va.nan_to_num(-7), vb.nan_to_num(-7)), k
        else:
            assert va == vb or (va != va and vb != vb), k
    a.reset()
    for p in batches:
        a.update(p)
    assert a.compute().keys() == ra.keys()


def test_run_long_options_survive_probes_and_checkpoints():
    """Run-long accumulation is the instrument's own option (no subclass needed): the probe
    runner leaves it alone, and its state round-trips through state_dict."""
    import torch

    from graddyn.instruments import GroupSplit, LearnedAt, Probe

    assert LearnedAt().reset_each_probe and not LearnedAt(run_long=True).reset_each_probe
    mask = torch.zeros(4, dtype=torch.bool)
    assert GroupSplit(mask).reset_each_probe
    assert not GroupSplit(mask, cumulative=True).reset_each_probe
    inst = LearnedAt(run_long=True)
    out = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    inst.update(Probe(outputs=out, targets=torch.tensor([0, 0]), indices=torch.tensor([3, 5]),
                      step=7))
    copy = LearnedAt(run_long=True)
    copy.load_state_dict(inst.state_dict())
    assert copy.compute()["frac_learned"] == inst.compute()["frac_learned"] == 0.5
    assert copy.learned_at() == inst.learned_at() == {3: 7, 5: -1}  # -1: misclassified now
