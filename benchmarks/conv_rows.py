"""Per-example convolution weight gradients: the convolution's own backward kernel with the
examples folded into its groups, against a batched matmul over im2col patches.

Usage:
    .venv/bin/python benchmarks/conv_rows.py                 # torch's default threads
    .venv/bin/python benchmarks/conv_rows.py --threads 1 --repeats 20

The engine's convolution rule builds per-example weight gradients (the book-keeping rows that
give a Gram and p.grad in one pass) by one of two routes: ``kernel`` runs
``aten.convolution_backward`` once with N x groups groups (torch.func's batching rule for
convolutions), ``bmm`` multiplies the output gradients (N, L, Cout) by the im2col patches
(N, L, Cin k). ``total`` is the summed weight gradient of a plain backward, for scale. The rule
takes the kernel route for groups of 8-64 input channels; this table is what that range rests
on. Each row checks that both routes agree.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from torch import nn

from graddyn.pergrad._im2col import patches
from graddyn.pergrad._rules_conv import _groups_last, _weight_grad

# (label, layer, input shape (N, Cin, *S))
CASES = [
    ("conv2d 3->16, 32x32", nn.Conv2d(3, 16, 3, padding=1), (32, 3, 32, 32)),
    ("conv2d 16->16, 32x32", nn.Conv2d(16, 16, 3, padding=1), (32, 16, 32, 32)),
    ("conv2d 16->32, stride 2", nn.Conv2d(16, 32, 3, stride=2, padding=1), (32, 16, 32, 32)),
    ("conv2d 32->32, 16x16", nn.Conv2d(32, 32, 3, padding=1), (32, 32, 16, 16)),
    ("conv2d 32->64, stride 2", nn.Conv2d(32, 64, 3, stride=2, padding=1), (32, 32, 16, 16)),
    ("conv2d 64->64, 8x8", nn.Conv2d(64, 64, 3, padding=1), (32, 64, 8, 8)),
    ("conv2d 64->64, 32x32, N 16", nn.Conv2d(64, 64, 3, padding=1), (16, 64, 32, 32)),
    ("conv2d 128->128, 16x16, N 16", nn.Conv2d(128, 128, 3, padding=1), (16, 128, 16, 16)),
    ("conv2d 256->256, 8x8, N 16", nn.Conv2d(256, 256, 3, padding=1), (16, 256, 8, 8)),
    ("conv2d 512->512, 4x4, N 16", nn.Conv2d(512, 512, 3, padding=1), (16, 512, 4, 4)),
    ("conv3d 1->8, 8^3", nn.Conv3d(1, 8, 3, padding=1), (32, 1, 8, 8, 8)),
    ("conv3d 8->16, 8^3", nn.Conv3d(8, 16, 3, padding=1), (32, 8, 8, 8, 8)),
]


def _bmm_rows(m: nn.Conv2d | nn.Conv3d, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients (N, groups, Cout/g, Cin/g k) from the im2col patches."""
    n, groups = x.shape[0], m.groups
    left = _groups_last(g.reshape(n, m.out_channels, -1), n, groups)  # (N, groups, L, Cout/g)
    right = _groups_last(patches(m, x), n, groups)  # (N, groups, L, Cin/g k)
    return left.transpose(-1, -2) @ right


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per route")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"median of {args.repeats} calls (ms)")
    print(f"{'layer':30s} {'kernel':>8s} {'bmm':>8s} {'total':>8s}  rule takes")
    for label, m, shape in CASES:
        x = torch.randn(shape)
        with torch.no_grad():
            g = torch.randn_like(m(x))
        kernel = _weight_grad(m, x, g, True)
        bmm = _bmm_rows(m, x, g)
        err = (kernel.reshape(bmm.shape[0], -1) - bmm.reshape(bmm.shape[0], -1)).abs().max()
        assert err <= 1e-3 * bmm.abs().max(), f"{label}: routes disagree by {err:.2e}"
        t_kernel = _median_ms(partial(_weight_grad, m, x, g, True), args.repeats)
        t_bmm = _median_ms(partial(_bmm_rows, m, x, g), args.repeats)
        t_total = _median_ms(partial(_weight_grad, m, x, g, False), args.repeats)
        takes = "kernel" if 8 <= m.weight.shape[1] <= 64 else "bmm"
        print(f"{label:30s} {t_kernel:8.2f} {t_bmm:8.2f} {t_total:8.2f}  {takes}")


if __name__ == "__main__":
    main()
