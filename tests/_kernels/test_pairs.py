"""The compiled pair statistics (``graddyn._kernels.pairs_jit``) against their NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graddyn._kernels as K
from graddyn import _gram
from graddyn._gram import cosine_matrix, pairs_from_grams
from graddyn._kernels import pair_kernels
from graddyn.instruments import confusion as C
from graddyn.instruments import stiffness as S

jit = pair_kernels()
try:
    import numba  # noqa: F401

    HAVE_NUMBA = True
except ImportError:
    HAVE_NUMBA = False
needs_jit = pytest.mark.skipif(not HAVE_NUMBA, reason="numba not available")


@needs_jit
def test_kernels_compile_where_numba_is_installed() -> None:
    """With numba present, a kernel that fails to compile must fail here (pair_kernels()
    would otherwise warn and fall back to NumPy, and the tests below would test nothing)."""
    assert jit is not None


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
    np.testing.assert_allclose(c, cosine_matrix(g), rtol=1e-12, atol=1e-15)
    for r in zero_rows:  # a zero gradient has cosine 0 with everything
        assert not c[r].any() and not c[:, r].any()


def test_pairs_from_grams_kernel_and_numpy_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    gs = grams(1, zero_rows=(3,))
    fast = pairs_from_grams(gs)
    monkeypatch.setattr(K, "ENABLED", False)
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
    monkeypatch.setattr(K, "ENABLED", False)
    slow = C.confusion_stats(inner, cos, num_bins=num_bins)
    assert fast.keys() == slow.keys()
    for key, value in slow.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(fast[key], value), key
        else:
            assert fast[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert int(fast["cos_hist"].sum()) == 205 and fast["cos_hist"][-1] >= 1  # 1.0: last bin


def test_switch_off_gives_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(K, "ENABLED", False)
    assert pair_kernels() is None


def _confusion_reference(inner: np.ndarray, cos: np.ndarray, quantiles: tuple, nb: int):
    """The NumPy path of ``confusion_stats`` (full sort), as (numbers, histogram)."""
    s = np.sort(cos)
    with np.errstate(invalid="ignore"):  # the mean of -inf and inf is NaN, as it should be
        mean = float(s.mean())
    numbers = [float(inner.min()), float(s[0]), mean, *C._quantiles_sorted(s, quantiles)]
    return np.array(numbers), C._histogram_sorted(s, nb).numpy()


def _cosine_cases() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    edges = -1.0 + 2.0 * np.arange(0, 21) / 20  # every bin edge itself, for 20 bins
    return [
        ("one", np.array([0.3])),
        ("two", np.array([0.5, -0.5])),
        ("uniform", rng.uniform(-1, 1, 4950)),
        ("narrow", 1e-3 * rng.standard_normal(4950)),  # most values in one or two bins
        ("ties", np.round(rng.uniform(-1, 1, 999), 1)),  # many equal values
        ("constant", np.full(50, 0.25)),
        ("edges", np.concatenate([edges, edges, rng.uniform(-1, 1, 40)])),
        ("outside", rng.uniform(-3, 3, 301)),  # below -1: first bin, above 1: last
        ("subnormal range", np.array([0.0, 5e-324, 1e-323, 0.0, 5e-324])),
        ("infinite", np.array([-np.inf, 0.2, np.inf, -0.7, 0.1])),
        ("nan", np.array([0.1, np.nan, -0.4, 0.9, np.nan, 0.0])),
    ]


@needs_jit
@pytest.mark.parametrize("num_bins", [1, 7, 20])
@pytest.mark.parametrize("name,cos", _cosine_cases(), ids=[n for n, _ in _cosine_cases()])
def test_confusion_kernel_matches_numpy_on_edge_cases(name: str, cos: np.ndarray,
                                                      num_bins: int) -> None:
    """The kernel on the sorted cosines: quantiles, minimum and histogram equal to NumPy's bit
    for bit (ties, constants, values on bin edges, outside [-1, 1], infinite, NaN); the mean
    to rounding."""
    quantiles = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
    inner = np.random.default_rng(1).standard_normal(cos.size)
    got, hist = jit.confusion_numbers(inner, np.sort(cos), np.asarray(quantiles), num_bins)
    want, want_hist = _confusion_reference(inner, cos, quantiles, num_bins)
    np.testing.assert_array_equal(hist, want_hist)
    np.testing.assert_array_equal(got[[0, 1]], want[[0, 1]])
    np.testing.assert_allclose(got[2], want[2], rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(got[3:], want[3:])  # NaN where the reference has NaN


@needs_jit
def test_upper_pairs_match_take() -> None:
    g64, c64 = pairs_from_grams(grams(3, b=11))
    flat = _gram.upper_flat(11)
    gu, cu = jit.upper_pairs(g64, c64)
    np.testing.assert_array_equal(gu, np.take(g64, flat))
    np.testing.assert_array_equal(cu, np.take(c64, flat))


@needs_jit
def test_stiffness_kernel_flags_bad_labels_and_keeps_nan() -> None:
    g64, c64 = pairs_from_grams(grams(4, b=5))
    assert jit.stiffness_sums(g64, c64, np.array([0, 1, 2, 1, 3]), 3).shape == (0, 3, 3)
    assert jit.stiffness_sums(g64, c64, np.array([0, 1, -1, 1, 0]), 3).shape == (0, 3, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        S.stiffness_sums(torch.from_numpy(g64.copy()), torch.tensor([0, 1, 2, 1, 3]), 3)
    g = g64.copy()
    g[0, 1] = g[1, 0] = np.nan
    y = np.array([0, 1, 1, 0, 2])
    got = jit.stiffness_sums(g, c64, y, 3)
    nan = np.zeros_like(got, dtype=bool)
    nan[1, 0, 1] = nan[1, 1, 0] = True  # sign(NaN) only in its own class pair (the NumPy
    np.testing.assert_array_equal(np.isnan(got), nan)  # reference's matmul spreads it)
    want = S._sums_numpy(g64, c64, y, 3)
    np.testing.assert_allclose(got[~nan], want[~nan], rtol=1e-12, atol=1e-12)
