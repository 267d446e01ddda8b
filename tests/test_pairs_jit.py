"""The compiled pair statistics (``graddyn._pairs_jit``) against their NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graddyn import _gram
from graddyn._gram import cosine_matrix_np, pair_kernels, pairs_from_grams
from graddyn.instruments import confusion as C
from graddyn.instruments import stiffness as S

jit = pair_kernels()
needs_jit = pytest.mark.skipif(jit is None, reason="numba not available")


def grams(seed: int, b: int = 9, layers: int = 3, zero_rows: tuple[int, ...] = (),
          dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Per-layer Grams of random gradients (some examples with zero gradients)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        g = torch.randn(b, 5, generator=gen, dtype=dtype)
        g[list(zero_rows)] = 0.0
        out.append(g @ g.T)
    return out


@needs_jit
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zero_rows", [(), (0,), (2, 5)])
def test_gram_and_cosines_match_numpy(dtype: torch.dtype, zero_rows: tuple[int, ...]) -> None:
    gs = grams(0, zero_rows=zero_rows, dtype=dtype)
    g, c = jit.gram_and_cosines(np.stack([t.numpy() for t in gs]))
    ref = sum(t.double() for t in gs).numpy()
    np.testing.assert_allclose(g, 0.5 * (ref + ref.T), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(g, g.T)  # exactly symmetric
    np.testing.assert_allclose(c, cosine_matrix_np(g), rtol=1e-12, atol=1e-15)
    for r in zero_rows:  # a zero gradient has cosine 0 with everything
        assert not c[r].any() and not c[:, r].any()


def test_pairs_from_grams_kernel_and_numpy_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    gs = grams(1, zero_rows=(3,))
    fast = pairs_from_grams(gs)
    monkeypatch.setattr(_gram, "KERNELS_ENABLED", False)
    slow = pairs_from_grams(gs)
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
        assert not a.flags.writeable and not b.flags.writeable
    with pytest.raises(ValueError, match="square"):
        pairs_from_grams([torch.ones(3, 4)])


@needs_jit
@pytest.mark.parametrize("seed", range(4))
def test_stiffness_sums_match_numpy(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    g64, c64 = pairs_from_grams(grams(seed, b=12, zero_rows=(4,)))
    g64 = g64.copy()
    g64[1, 2] = g64[2, 1] = 0.0  # sign(0) = 0
    y = torch.randint(0, 5, (12,), generator=gen).numpy()  # some classes may be missing
    k = 6
    np.testing.assert_allclose(jit.stiffness_sums(g64, c64, y, k),
                               S._sums_numpy(g64, c64, y, k), rtol=1e-12, atol=1e-12)


@needs_jit
def test_stiffness_means_match_numpy() -> None:
    g64, c64 = pairs_from_grams(grams(7, b=10))
    y = np.array([0, 0, 1, 1, 1, 2, 2, 0, 1, 3])  # class 4 empty; class 3 has one example
    sums = S._sums_numpy(g64, c64, y, 5)
    got, want = jit.stiffness_means(sums), S._means_numpy(sums)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-12)  # NaN where no pairs
    assert np.isnan(got[1][:, 4]).all() and np.isnan(got[1][:, 3, 3]).all()


@needs_jit
def test_stiffness_means_all_one_class_has_nan_between() -> None:
    g64, c64 = pairs_from_grams(grams(8, b=4))
    sums = S._sums_numpy(g64, c64, np.zeros(4, np.int64), 1)
    scalars, _ = jit.stiffness_means(sums)
    np.testing.assert_allclose(scalars, S._means_numpy(sums)[0])
    assert np.isnan(scalars[2]) and np.isnan(scalars[5])


@needs_jit
@pytest.mark.parametrize("num_bins", [1, 7, 20])
def test_confusion_numbers_match_numpy(num_bins: int, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(num_bins)
    cos = torch.cat([torch.rand(200, generator=gen, dtype=torch.float64) * 2 - 1,
                     torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.5], dtype=torch.float64)])
    inner = torch.randn(205, generator=gen, dtype=torch.float64)
    fast = C.confusion_stats(inner, cos, num_bins=num_bins)
    monkeypatch.setattr(_gram, "KERNELS_ENABLED", False)
    monkeypatch.setattr(C, "pair_kernels", lambda: None)
    slow = C.confusion_stats(inner, cos, num_bins=num_bins)
    assert fast.keys() == slow.keys()
    for key, value in slow.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(fast[key], value), key
        else:
            assert fast[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert int(fast["cos_hist"].sum()) == 205 and fast["cos_hist"][-1] >= 1  # 1.0: last bin


def test_switch_off_gives_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gram, "KERNELS_ENABLED", False)
    assert pair_kernels() is None
