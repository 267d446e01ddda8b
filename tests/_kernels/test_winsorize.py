"""The compiled winsorized-mean kernel against the sorting reference (``graddyn._robust``), the
per-example loop (``graddyn.reference``), and itself under chunking, tiling and threads."""

import numpy as np
import pytest
import torch
from tests.test_robust import numpy_reference
from torch import nn

import graddyn._kernels as switch
from graddyn import _robust as R
from graddyn._kernels import winsorize as K
from graddyn.interventions._winsorized_mean import winsorized_mean
from graddyn.reference import DenseBatchGrads, per_example_grads

pytestmark = pytest.mark.skipif(not K.usable(torch.zeros(1, dtype=torch.float64)),
                                reason="numba kernel unavailable (reference tested elsewhere)")

CASES = [(b, c) for b in (1, 3, 4, 5, 7, 8, 10, 33, 100) for c in range(0, (b + 1) // 2)]
CASES = [(b, c) for b, c in CASES if c < 10 or c in (16, 24, 49)]
DTYPES = [torch.float64, torch.float32]


def tied_block(b: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """(b, 41): integer values (ties everywhere), a few random columns, a constant column,
    a zero column, a column zero for some rows only, repeated rows."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (b, 41), generator=gen).to(dtype)
    x[:, :5] = torch.randn(b, 5, generator=gen, dtype=dtype)
    x[:, 5], x[:, 6] = 2.0, 0.0
    x[: b // 2, 7] = 0.0
    if b > 3:
        x[1] = x[0]
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("b,c", CASES, ids=[f"B{b}-c{c}" for b, c in CASES])
def test_block_kernel_matches_reference_and_numpy(b, c, dtype):
    x = tied_block(b, 100 * b + c, dtype)
    got = K.column_corrections(x, c)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, R.extremes_correction(x, c), rtol=tol, atol=tol)
    mean = (x.double().sum(0) + got.double()) / b
    np.testing.assert_allclose(mean.numpy(), numpy_reference(x.double().numpy(), c),
                               rtol=tol, atol=tol)


def test_c_zero_gives_zero_correction_and_the_exact_mean():
    x = tied_block(9, 0, torch.float64)
    assert torch.equal(K.column_corrections(x, 0), torch.zeros(41, dtype=torch.float64))
    assert torch.equal(R.winsorized_mean_chunked(x, 0, 64), x.mean(0))


def outer_problem(n: int, rows: int, cols: int, dtype: torch.dtype, seed: int,
                  x_nonneg: bool = True):
    """ReLU-like factors: G (N, rows) with dead units (zero for some or all examples) and
    few values of one sign; X (N, cols) with zeros, >= 0 (as ReLU outputs) or mixed."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, rows, generator=gen, dtype=dtype)
    g[:, 0] = 0.0  # a unit dead for the whole batch
    g[:, 1] = torch.randint(-2, 3, (n,), generator=gen).to(dtype)  # ties, some zeros
    g[:, 2] = 0.0
    g[0, 2], g[1, 2] = 1.5, -0.5  # one positive, one negative, the rest zeros
    g[:, 3] = g[:, 3].abs()  # no negatives
    g[:, 4] = -g[:, 4].abs()  # no positives
    x = torch.randn(n, cols, generator=gen, dtype=dtype)
    x[x.abs() < 0.2] = 0.0
    x[:, 2] = 0.0
    return g, (x.abs() if x_nonneg else x)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("n,c", [(3, 1), (5, 2), (7, 3), (16, 1), (33, 4), (100, 8), (21, 10)])
@pytest.mark.parametrize("x_nonneg", [True, False], ids=["x>=0", "x-mixed"])
@pytest.mark.parametrize("sparse_side", ["left", "right"])
def test_fused_outer_equals_materialised(n, c, dtype, x_nonneg, sparse_side):
    """Both orientations (the sparser factor on the kernel's row side), and with X >= 0
    the split of examples by the sign of G (each feeds one list) or its fallback."""
    g, x = outer_problem(n, 6, 37, dtype, n + c, x_nonneg)
    if sparse_side == "left":  # more zeros in G: the kernel skips examples per row of G
        g[g.abs() < 0.5] = 0.0
    else:  # more zeros in X: the transposed problem is solved
        x[x.abs() < 1.0] = 0.0
    fused = K.outer_corrections(g, x, c)  # (6, 37)
    block = (g[:, :, None] * x[:, None, :]).reshape(n, -1)  # materialised as rows_into does
    assert torch.equal(fused.reshape(-1), K.column_corrections(block, c))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(fused.reshape(-1), R.extremes_correction(block, c),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("c", [1, 2, 5])
def test_tiles_threads_and_splits_do_not_change_bits(c, monkeypatch):
    g, x = outer_problem(40, 6, 300, torch.float32, seed=c)
    want = K.outer_corrections(g, x, c)
    monkeypatch.setattr(K, "TILE_BYTES", 1)  # the smallest tiles (16 columns)
    monkeypatch.setattr(K, "MIN_PARALLEL_VALUES", 0)  # always split
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3, 8):  # 8 > rows: columns are split instead of rows
            torch.set_num_threads(t)
            assert torch.equal(K.outer_corrections(g, x, c), want), t
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("c", [1, 3])
def test_chunked_kernel_matches_reference_rows(c):
    x = tied_block(33, c, torch.float64).repeat(1, 5)
    whole = R.winsorized_mean_chunked(x, c, 1 << 30)
    assert torch.equal(R.winsorized_mean_chunked(x, c, 33 * 8 * 2 * 7), whole)
    torch.testing.assert_close(whole, R.winsorized_mean_rows(x, c), rtol=1e-12, atol=1e-12)


def relu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, 3))


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")


def captured(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    from graddyn import capture

    with capture(model) as cap:
        losses = ce(model(x), y)
    return cap.backward(losses)


@pytest.mark.parametrize("c", [0, 1, 2, 6])
def test_batchgrads_fused_path_matches_the_per_example_loop(c, monkeypatch):
    """Linear layers go through the fused kernel (spied), the rest through blocks; both, and
    the reference fallback, agree with the per-example reference."""
    model, b = relu_mlp(), 13
    x, y = torch.randn(b, 6), torch.randint(0, 3, (b,))
    x[:, :2] = 0.0  # zero inputs (as MNIST borders)
    want = DenseBatchGrads(per_example_grads(model, ce, x, y), (b,)).winsorized_mean(c)
    calls = []
    real = K.outer_corrections
    monkeypatch.setattr(K, "outer_corrections", lambda *a: calls.append(1) or real(*a))
    got = winsorized_mean(captured(model, x, y), c, memory_budget_bytes=1)
    assert len(calls) == (3 if c > 0 else 0)  # the three weights; biases are blocks
    monkeypatch.setattr(switch, "ENABLED", False)
    eager = winsorized_mean(captured(model, x, y), c)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(eager[k], want[k], rtol=1e-12, atol=1e-12)


def test_sequence_linear_uses_blocks_and_matches(monkeypatch):
    """A Linear on (B, T, d) input (T > 1) is not one outer product: blocks + kernel there;
    the Linear after the Flatten is fused."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 2))
    x, y = torch.randn(9, 3, 4), torch.randint(0, 2, (9,))
    fused = []
    real = K.outer_corrections
    monkeypatch.setattr(K, "outer_corrections", lambda g, *a: fused.append(g.shape) or real(g, *a))
    got = winsorized_mean(captured(model, x, y), 2)
    assert fused == [torch.Size([9, 2])]  # only the last weight (2 outputs)
    want = DenseBatchGrads(per_example_grads(model, ce, x, y), (9,)).winsorized_mean(2)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)


def test_usable_says_no_outside_its_domain(monkeypatch):
    assert not K.usable(torch.zeros(3, dtype=torch.float16))
    assert not K.usable(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.int64))
    monkeypatch.setattr(switch, "ENABLED", False)
    assert not K.usable(torch.zeros(3, dtype=torch.float64))


def test_environment_switch():
    assert switch.enabled_by_env({}) and switch.enabled_by_env({"GRADDYN_NO_KERNEL": "0"})
    assert not switch.enabled_by_env({"GRADDYN_NO_KERNEL": "1"})


def test_missing_numba_falls_back(monkeypatch):
    monkeypatch.setattr(K, "_jit", None)
    monkeypatch.setattr(K, "_import_failed", True)
    monkeypatch.setattr(K, "_ready", {})
    x = tied_block(7, 1, torch.float64)
    assert not K.usable(x)
    assert torch.equal(R.winsorized_mean_chunked(x, 2, 1 << 20), R.winsorized_mean_rows(x, 2))


def test_a_kernel_that_cannot_compile_warns_and_falls_back(monkeypatch):
    class Broken:
        @staticmethod
        def corrections(*args):
            raise RuntimeError("no LLVM here")

    monkeypatch.setattr(K, "_jit", Broken)
    monkeypatch.setattr(K, "_ready", {})
    with pytest.warns(UserWarning, match="PyTorch reference"):
        assert not K.usable(torch.zeros(3, dtype=torch.float64))
    assert not K.usable(torch.zeros(3, dtype=torch.float64))  # decided once


@pytest.mark.parametrize("kernel_on", [True, False], ids=["kernel", "reference"])
def test_conv_blocks_match_the_loop_for_any_block_size(kernel_on, monkeypatch):
    """Conv weights go through materialised blocks; the sum comes from the blocks too."""
    monkeypatch.setattr(switch, "ENABLED", kernel_on)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    x, y = torch.randn(11, 2, 6, 6), torch.randint(0, 3, (11,))
    grads = captured(model, x, y)
    want = DenseBatchGrads(per_example_grads(model, ce, x, y), (11,)).winsorized_mean(2)
    whole = winsorized_mean(grads, 2)
    one_row = winsorized_mean(grads, 2, memory_budget_bytes=1)
    for k in want:  # blocks of other shapes may round the materialising bmm differently
        torch.testing.assert_close(one_row[k], whole[k], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(whole[k], want[k], rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_threads_work_in_a_forked_child(monkeypatch):
    """The thread pool made before a fork is replaced in the child (else jobs never run)."""
    import os

    monkeypatch.setattr(K, "MIN_PARALLEL_VALUES", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g, x = outer_problem(20, 6, 50, torch.float64, seed=3)
        want = K.outer_corrections(g, x, 2)  # starts the pool in the parent
        pid = os.fork()
        if pid == 0:  # child: must finish (a hang would time the test out)
            ok = torch.equal(K.outer_corrections(g, x, 2), want)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        torch.set_num_threads(threads)
