import math

import pytest
import torch

from graddyn.instruments import INSTRUMENTS, GroupSplit, Probe, split_from_gram
from graddyn.instruments.group_split import null_masks

from .conftest import CORRUPT, flat, groups


def reference(g: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    b = g.shape[0]
    gbar = g.mean(0)
    g_c = g[mask].sum(0) / b
    g_p = g[~mask].sum(0) / b
    contrib = g @ gbar / b
    return {"f_p": float(gbar @ g_p / (gbar @ gbar)), "f_c": float(gbar @ g_c / (gbar @ gbar)),
            "mean_p": float(contrib[~mask].mean()), "mean_c": float(contrib[mask].mean())}


def test_one_batch_matches_materialised_reference(batches):
    p = batches[1]
    got = split_from_gram(p.grads.gram(), groups(p))
    ref = reference(flat(p), groups(p))
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-10)
    assert got["f_p"] + got["f_c"] == pytest.approx(1.0)


def test_pooled_is_cumulative_and_last_is_latest(batches):
    inst = INSTRUMENTS.get("group_split")(CORRUPT, null_worlds=2, seed=3)
    for p in batches:
        inst.update(p)
    got = inst.compute()
    tot = sum(float(flat(p).mean(0) @ flat(p).mean(0)) for p in batches)
    sum_c = sum(float(flat(p).mean(0) @ flat(p)[groups(p)].sum(0)) / len(p.targets)
                for p in batches)
    n_c = sum(int(groups(p).sum()) for p in batches)
    assert got["f_c"] == pytest.approx(sum_c / tot)
    assert got["mean_c"] == pytest.approx(sum_c / n_c)
    last = reference(flat(batches[-1]), groups(batches[-1]))
    assert got["last_f_c"] == pytest.approx(last["f_c"])
    assert {"null0/f_p", "null1/mean_c"} <= set(got) and "null2/f_p" not in got


def test_null_worlds_are_seeded_permutations():
    mask = torch.tensor([True, False, False, True, False, False])
    a, b = null_masks(mask, 2, seed=1, step=7), null_masks(mask, 2, seed=1, step=7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(int(m.sum()) == 2 for m in a)


def test_empty_group_gives_nan(batches):
    p = batches[0]
    got = split_from_gram(p.grads.gram(), torch.zeros(6, dtype=torch.bool))
    assert got["f_p"] == pytest.approx(1.0) and math.isnan(got["mean_c"])


def test_reset_empty_and_errors(batches):
    inst = GroupSplit(CORRUPT)
    with pytest.raises(RuntimeError, match="before any update"):
        inst.compute()
    with pytest.raises(ValueError, match="group mask"):
        inst.update(Probe(grads=batches[0].grads))
    with pytest.raises(ValueError, match="bool mask"):
        split_from_gram(torch.eye(3), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="null_worlds"):
        GroupSplit(CORRUPT, null_worlds=-1)
    inst.update(batches[0])
    inst.reset()
    with pytest.raises(RuntimeError):
        inst.compute()
