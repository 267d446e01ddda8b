import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import graddyn._kernels as switch
from graddyn import _robust as R


def numpy_reference(x: np.ndarray, c: int) -> np.ndarray:
    """The paper's code: clip at per-coordinate 'nearest' percentiles, then average."""
    b = x.shape[0]
    q_lo, q_hi = R.percentile_for_c(c, b)
    lo = np.percentile(x, q_lo, axis=0, method="nearest")
    hi = np.percentile(x, q_hi, axis=0, method="nearest")
    return np.clip(x, lo, hi).mean(0)


CASES = [(b, c) for b in (1, 2, 3, 4, 5, 7, 10, 33, 100) for c in range(0, (b + 1) // 2)]
CASES = [(b, c) for b, c in CASES if c < 12 or c in (16, 24, 49)]


@pytest.mark.parametrize("b,c", CASES, ids=[f"B{b}-c{c}" for b, c in CASES])
def test_matches_numpy_nearest_percentiles_with_ties(b, c):
    gen = torch.Generator().manual_seed(b * 100 + c)
    x = torch.randint(-3, 4, (b, 37), generator=gen).double()  # many ties
    x[:, :5] = torch.randn(b, 5, generator=gen, dtype=torch.float64)
    x[:, 5] = 2.0  # a constant column
    got = R.winsorized_mean_rows(x, c)
    np.testing.assert_allclose(got.numpy(), numpy_reference(x.numpy(), c), rtol=1e-12, atol=1e-12)


def test_percentile_correspondence_round_trips():
    for b in (3, 10, 100, 128):
        for c in range(0, (b + 1) // 2):
            q_lo, _ = R.percentile_for_c(c, b)
            assert R.c_for_percentile(q_lo, b) == c


def test_c_zero_is_exactly_the_mean():
    x = torch.randn(9, 50)
    assert torch.equal(R.winsorized_mean_rows(x, 0), x.mean(0))
    assert torch.equal(R.winsorized_mean_chunked(x, 0, memory_budget_bytes=8), x.mean(0))


@pytest.mark.parametrize("kernel_on", [True, False], ids=["kernel", "reference"])
@pytest.mark.parametrize("c", [1, 3, 4, 7])
def test_chunked_equals_unchunked_exactly(c, kernel_on, monkeypatch):
    monkeypatch.setattr(switch, "ENABLED", kernel_on)
    x = torch.randn(20, 1000, dtype=torch.float32)
    full = R.winsorized_mean_rows(x, c)
    whole = R.winsorized_mean_chunked(x, c, memory_budget_bytes=1 << 30)
    assert torch.equal(R.winsorized_mean_chunked(x, c, memory_budget_bytes=20 * 4 * 2 * 77), whole)
    # the kernel sums its correction in another order: equal to the sort up to rounding (with
    # the kernel off both are the sort itself, so the independent NumPy reference checks it)
    torch.testing.assert_close(whole, full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(whole.double().numpy(), numpy_reference(x.double().numpy(), c),
                               rtol=1e-5, atol=1e-6)


def test_column_slices_respect_the_budget():
    slices = R.column_slices(100, 1000, 4, memory_budget_bytes=100 * 4 * 2 * 64)
    assert all(s.stop - s.start <= 64 for s in slices) and slices[-1].stop == 1000
    assert R.column_slices(100, 3, 4, memory_budget_bytes=1) == [slice(0, 1), slice(1, 2),
                                                                 slice(2, 3)]


@pytest.mark.parametrize(
    "c,b,err,match",
    [(-1, 10, ValueError, ">= 0"), (5, 10, ValueError, "c < B/2"), (7, 10, ValueError, "c < B/2"),
     (1.5, 10, TypeError, "must be an int"), (True, 10, TypeError, "must be an int"),
     (0, 0, ValueError, "at least one row")],
)
def test_bad_c_is_rejected(c, b, err, match):
    with pytest.raises(err, match=match):
        R.check_c(c, b)


def test_other_errors():
    with pytest.raises(ValueError, match=r"\(B, n\)"):
        R.winsorized_mean_rows(torch.ones(3), 0)
    with pytest.raises(ValueError, match=r"\(B, n\)"):
        R.winsorized_mean_chunked(torch.ones(3), 0, 10)
    with pytest.raises(TypeError, match="floating point"):
        R.winsorized_mean_rows(torch.ones(3, 2, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        R.column_slices(3, 3, 4, 0)
    with pytest.raises(ValueError, match=r"\[0, 50\]"):
        R.c_for_percentile(75.0, 10)


@settings(max_examples=60, deadline=None)
@given(st.integers(3, 40), st.integers(0, 19), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_property_matches_sorted_definition(b, c, levels, seed):
    """Any B, any valid c, few distinct values (ties everywhere): the definition by sorting."""
    c = c % ((b + 1) // 2)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (b, 9), generator=gen).double()
    s = x.sort(0).values
    ref = (s[c : b - c].sum(0) + c * (s[c] + s[b - 1 - c])) / b
    assert torch.allclose(R.winsorized_mean_rows(x, c), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("b,c", CASES, ids=[f"B{b}-c{c}" for b, c in CASES])
def test_extremes_correction_plus_sum_matches_numpy(b, c):
    gen = torch.Generator().manual_seed(b * 100 + c + 7)
    x = torch.randint(-3, 4, (b, 37), generator=gen).double()  # many ties
    x[:, :5] = torch.randn(b, 5, generator=gen, dtype=torch.float64)
    got = (x.sum(0) + R.extremes_correction(x, c)) / b
    np.testing.assert_allclose(got.numpy(), numpy_reference(x.numpy(), c), rtol=1e-12, atol=1e-12)
