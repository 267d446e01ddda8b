import pytest
import torch

from graddyn.instruments import INSTRUMENTS, Coherence, coherence_from_gram

from .conftest import flat, pooled


def reference(g: torch.Tensor) -> dict[str, float]:
    n = g.shape[0]
    pairs = [g[i] @ g[j] for i in range(n) for j in range(n) if i != j]
    mean_sq = (g * g).sum(1).mean()
    return {"alpha": float(torch.stack(pairs).mean() / mean_sq),
            "alpha_plugin": float((g.mean(0) @ g.mean(0)) / mean_sq),
            "m_coherence": float(g.sum(0) @ g.sum(0) / (g * g).sum())}


def test_matches_reference_on_one_batch(batches):
    got = coherence_from_gram(batches[1].grads.gram())
    ref = reference(flat(batches[1]))
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-10)


def test_streaming_equals_one_big_batch_including_cross_batch_pairs(batches):
    inst = Coherence()
    for p in batches:
        inst.update(p)
    got = inst.compute()
    ref = reference(flat(pooled(batches)))
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-10)
    assert got["num_examples"] == 19
    within = [reference(flat(p))["m_coherence"] for p in batches]
    assert got["m_coherence_within"] == pytest.approx(sum(within) / 3)


def test_m_coherence_extremes():
    g = torch.eye(4)
    assert coherence_from_gram(g @ g.T)["m_coherence"] == pytest.approx(1.0)
    g = torch.ones(4, 3)
    out = coherence_from_gram(g @ g.T)
    assert out["m_coherence"] == pytest.approx(4.0) and out["alpha"] == pytest.approx(1.0)


def test_reset_and_empty(batches):
    inst = INSTRUMENTS.get("coherence")()
    with pytest.raises(RuntimeError, match="before any update"):
        inst.compute()
    inst.update(batches[0])
    inst.reset()
    inst.update(batches[1])
    ref = reference(flat(batches[1]))["m_coherence"]
    assert inst.compute()["m_coherence"] == pytest.approx(ref)


def test_errors():
    from graddyn.instruments import Probe

    with pytest.raises(ValueError, match="needs per-example gradients"):
        Coherence().update(Probe())
    with pytest.raises(ValueError, match="N >= 2"):
        coherence_from_gram(torch.ones(1, 1))


def test_batch_coherence_is_the_mean_of_each_batch_reference(batches):
    from graddyn.instruments import BatchCoherence

    inst = BatchCoherence()
    inst.update(batches[0])
    one = inst.compute()
    for k, v in reference(flat(batches[0])).items():
        assert one[k] == pytest.approx(v, rel=1e-10)
    for p in batches[1:]:
        inst.update(p)
    got = inst.compute()
    refs = [reference(flat(p)) for p in batches]
    for k in refs[0]:
        assert got[k] == pytest.approx(sum(r[k] for r in refs) / 3, rel=1e-10)
    assert got["num_batches"] == 3
