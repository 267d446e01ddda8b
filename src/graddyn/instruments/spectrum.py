"""Spectrum of what a network has learned: the F-principle instruments.

The frequency principle (F-principle; Xu, Zhang, Luo, Xiao & Ma, "Frequency principle: Fourier
analysis sheds light on deep neural networks", 2019/2020; Rahaman et al. 2019 call it spectral
bias) says networks fit a target from low to high frequency. Ma, Xu & Zhang ("Frequency
principle in deep learning beyond gradient-descent-based training", 2021) report that it also
holds for conjugate gradient, BFGS, Powell and particle swarm training.

Pure functions, all shapes explicit:

* ``dft_1d`` / ``grid_frequencies``: the DFT of samples on a uniform grid, ``Y_k = sum_j y_j
  exp(-2 pi i j k / N)`` for ``k = 0..N//2``, at angular frequencies ``omega_k = 2 pi k / (N h)``.
* ``nudft``: the non-uniform DFT ``Y(omega) = sum_j y_j exp(-i omega (x_j - origin))`` for
  irregular inputs; on a uniform grid with ``origin = x_0`` it equals ``dft_1d``.
* ``target_peaks``: indices of the peaks of ``|Y_k|`` (``scipy.signal.find_peaks``).
* ``peak_relative_error``: ``Delta_k = | |Yhat_k| - |Y_k| | / |Y_k|`` at the peaks.
* ``lowpass`` / ``band_errors``: the Gaussian filtering method for inputs of a few dimensions,
  ``y_low(x_i) = sum_j y_j G(x_i - x_j) / sum_j G(x_i - x_j)``, ``G(x) = exp(-|x|^2 / (2 delta))``,
  ``y_high = y - y_low``, and the relative errors ``e_low``, ``e_high`` of the prediction in
  each band (Xu et al. 2020, section 4).
* ``projection_errors``: the projection method, ``nudft`` of the inputs projected on one
  direction (e.g. the first principal component), relative error per frequency.

``Spectrum`` wraps them as an instrument (``needs_grads = False``) for any training loop.
"""

from __future__ import annotations

from typing import Any

import torch
from scipy.signal import find_peaks

from graddyn.instruments._base import Instrument, Probe

__all__ = [
    "Spectrum",
    "band_errors",
    "dft_1d",
    "grid_frequencies",
    "is_uniform_grid",
    "lowpass",
    "nudft",
    "peak_relative_error",
    "projection_errors",
    "spectrum_1d",
    "target_peaks",
]


def _as_vector(y: torch.Tensor, what: str) -> torch.Tensor:
    """(N,) or (N, 1) -> (N,); anything else is an error naming the fix."""
    if y.dim() == 2 and y.shape[1] == 1:
        return y[:, 0]
    if y.dim() != 1:
        raise ValueError(
            f"{what} must have shape (N,) or (N, 1) for a 1-D spectrum, got {tuple(y.shape)}; "
            "use band_errors or projection_errors for inputs of several dimensions"
        )
    return y


def dft_1d(y: torch.Tensor) -> torch.Tensor:
    """DFT of uniform samples: ``Y_k = sum_j y_j exp(-2 pi i j k / N)``, k = 0..N//2.

    Shapes: y (N,) or (N, 1) -> complex (N//2 + 1,). Cost O(N log N).

    >>> n = 16; j = torch.arange(n, dtype=torch.float64)
    >>> int(dft_1d(torch.sin(2 * torch.pi * 3 * j / n)).abs().argmax())
    3
    """
    return torch.fft.rfft(_as_vector(y, "y"))


def is_uniform_grid(x: torch.Tensor, rtol: float = 1e-6) -> bool:
    """True when the sorted 1-D inputs are equally spaced (relative tolerance ``rtol``)."""
    d = torch.diff(_as_vector(x, "x"))
    return bool(len(d) > 0 and (d > 0).all() and torch.allclose(d, d[0].expand_as(d), rtol=rtol))


def grid_frequencies(x: torch.Tensor) -> torch.Tensor:
    """Angular frequencies of the ``dft_1d`` bins on grid x: ``omega_k = 2 pi k / (N h)``.

    Shapes: x (N,) or (N, 1), uniform with spacing h -> (N//2 + 1,).

    >>> x = torch.linspace(-torch.pi, torch.pi, 9, dtype=torch.float64)[:-1]
    >>> grid_frequencies(x)[:3].tolist()
    [0.0, 1.0, 2.0]
    """
    x = _as_vector(x, "x")
    n = len(x)
    h = (x[-1] - x[0]) / (n - 1)
    return 2 * torch.pi * torch.arange(n // 2 + 1, dtype=x.dtype, device=x.device) / (n * h)


def nudft(
    x: torch.Tensor, y: torch.Tensor, omegas: torch.Tensor, origin: float = 0.0
) -> torch.Tensor:
    """Non-uniform DFT: ``Y(omega) = sum_j y_j exp(-i omega (x_j - origin))``.

    Shapes: x (N,), y (N,), omegas (K,) -> complex (K,). Cost O(N K) time and memory.
    With x a uniform grid, ``origin = x[0]`` and ``omegas = grid_frequencies(x)`` it equals
    ``dft_1d(y)`` exactly (up to rounding).

    >>> x = torch.tensor([0.0, 0.5, 2.0]); y = torch.ones(3)
    >>> nudft(x, y, torch.zeros(1)).real.item()
    3.0
    """
    x, y = _as_vector(x, "x"), _as_vector(y, "y")
    phase = -torch.outer(omegas.to(torch.float64), x.to(torch.float64) - origin)  # (K, N)
    return torch.exp(1j * phase) @ y.to(torch.complex128)


def spectrum_1d(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(angular frequencies (K,), complex spectrum (K,)) of y on inputs x (N,).

    A uniform grid uses the FFT; irregular inputs use ``nudft`` at the frequencies of a uniform
    grid with the same span and count, so the two paths agree in meaning.
    """
    x = _as_vector(x, "x")
    order = torch.argsort(x)
    x, y = x[order], _as_vector(y, "y")[order]
    if is_uniform_grid(x):
        return grid_frequencies(x), dft_1d(y).to(torch.complex128)
    n = len(x)
    h = (x[-1] - x[0]) / (n - 1)
    omegas = 2 * torch.pi * torch.arange(n // 2 + 1, dtype=x.dtype, device=x.device) / (n * h)
    return omegas, nudft(x, y, omegas, origin=float(x[0]))


def target_peaks(spectrum: torch.Tensor, rel_height: float = 0.1) -> torch.Tensor:
    """Indices k of the local maxima of ``|Y_k|`` at least ``rel_height * max |Y|`` high.

    Uses ``scipy.signal.find_peaks``; k = 0 (the mean) and the last bin are never peaks.
    Shapes: spectrum (K,) complex or real -> (P,) int64, increasing.

    >>> n = 64; j = torch.arange(n, dtype=torch.float64)
    >>> y = torch.sin(2 * torch.pi * 2 * j / n) + torch.sin(2 * torch.pi * 7 * j / n)
    >>> target_peaks(dft_1d(y)).tolist()
    [2, 7]
    """
    if not 0.0 <= rel_height < 1.0:
        raise ValueError(f"rel_height must be in [0, 1), got {rel_height}; try 0.1")
    mag = spectrum.abs().detach().cpu().numpy()
    idx, _ = find_peaks(mag, height=rel_height * float(mag.max(initial=0.0)))
    return torch.as_tensor(idx, dtype=torch.int64)


def peak_relative_error(
    pred_spectrum: torch.Tensor, target_spectrum: torch.Tensor, peaks: torch.Tensor
) -> torch.Tensor:
    """``Delta_k = | |Yhat_k| - |Y_k| | / |Y_k|`` at the peak indices (Xu et al.; Ma et al.).

    Shapes: spectra (K,), peaks (P,) -> (P,) real.

    >>> peak_relative_error(torch.tensor([0.0, 1.5]), torch.tensor([1.0, 2.0]), torch.tensor([1]))
    tensor([0.2500])
    """
    target = target_spectrum[peaks].abs()
    if (target == 0).any():
        raise ValueError("a peak has |Y_k| = 0; choose peaks with target_peaks(target_spectrum)")
    return (pred_spectrum[peaks].abs() - target).abs() / target


def lowpass(x: torch.Tensor, y: torch.Tensor, delta: float) -> torch.Tensor:
    """Gaussian low-pass filter of samples y on inputs x (Xu et al. 2020, filtering method).

    ``y_low(x_i) = sum_j y_j G(x_i - x_j) / sum_j G(x_i - x_j)``,
    ``G(x) = exp(-|x|^2 / (2 delta))``.
    Shapes: x (N, D) or (N,), y (N,) or (N, C) -> same shape as y. Cost O(N^2 D).

    >>> lowpass(torch.zeros(3, 1), torch.tensor([0.0, 3.0, 6.0]), 1.0).tolist()
    [3.0, 3.0, 3.0]
    """
    if delta <= 0:
        raise ValueError(f"delta must be > 0 (a variance in input units^2), got {delta}")
    x2 = x.reshape(len(x), -1)
    kernel = torch.exp(-torch.cdist(x2, x2).square() / (2 * delta))  # (N, N)
    weights = kernel / kernel.sum(dim=1, keepdim=True)
    return weights @ y


def band_errors(
    x: torch.Tensor, y: torch.Tensor, y_hat: torch.Tensor, delta: float
) -> tuple[float, float]:
    """Relative errors of y_hat in the low and high frequency bands: (e_low, e_high).

    ``e_low = ||y_low - yhat_low|| / ||y_low||``, ``e_high`` likewise with ``y_high = y - y_low``
    (Xu et al. 2020). The F-principle predicts e_low falls before e_high.
    Shapes: x (N, D), y and y_hat (N,) or (N, C) -> two floats.
    """
    y_low, p_low = lowpass(x, y, delta), lowpass(x, y_hat, delta)
    e_low = torch.linalg.norm(y_low - p_low) / torch.linalg.norm(y_low)
    e_high = torch.linalg.norm((y - y_low) - (y_hat - p_low)) / torch.linalg.norm(y - y_low)
    return float(e_low), float(e_high)


def projection_errors(
    x: torch.Tensor,
    y: torch.Tensor,
    y_hat: torch.Tensor,
    omegas: torch.Tensor,
    direction: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projection method: ``| F_p[y_hat](omega) - F_p[y](omega) | / | F_p[y](omega) |``.

    ``F_p[y](omega) = sum_i y_i exp(-i omega x_i . p)`` with p the unit ``direction`` (default:
    the first principal component of x). Shapes: x (N, D), y, y_hat (N,), omegas (K,) -> (K,).
    """
    x2 = x.reshape(len(x), -1)
    if direction is None:
        centred = x2 - x2.mean(dim=0)
        direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    p = direction / torch.linalg.norm(direction)
    t = x2 @ p.to(x2.dtype)  # (N,)
    ft, fp = nudft(t, y, omegas), nudft(t, y_hat, omegas)
    return (fp - ft).abs() / ft.abs()


class Spectrum(Instrument, name="spectrum"):
    """Per-peak relative error of the network output on a fixed 1-D input set.

    ``update`` takes the probe's ``outputs`` (N,) or (N, 1) when they are N rows, else
    evaluates ``probe.model`` on ``x``; it keeps the latest output (the inputs are one fixed
    set, so there is nothing to accumulate). ``compute`` returns
    ``{"rel_err_k{k}": Delta_k, "loss": mse}`` for the target's peaks k (or the given ``peaks``).

    >>> x = torch.linspace(-torch.pi, torch.pi, 65, dtype=torch.float64)[:-1, None]
    >>> inst = Spectrum(x, torch.sin(x) + torch.sin(3 * x))
    >>> inst.update(Probe(outputs=torch.sin(x)))
    >>> {k: round(v, 6) for k, v in inst.compute().items() if k != "loss"}
    {'rel_err_k1': 0.0, 'rel_err_k3': 1.0}
    """

    needs_grads = False

    def __init__(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        peaks: torch.Tensor | None = None,
        rel_height: float = 0.1,
    ) -> None:
        self.x = x
        self.target = _as_vector(target, "target")
        self._omegas, self.target_spectrum = spectrum_1d(x, self.target)
        self.peaks = target_peaks(self.target_spectrum, rel_height) if peaks is None else peaks
        if len(self.peaks) == 0:
            raise ValueError("the target spectrum has no peaks; pass peaks=... explicitly")
        self.add_state("_output", None)  # (N,) the latest output on x; nothing to combine

    @property
    def peak_frequencies(self) -> torch.Tensor:
        """Angular frequencies (P,) of the peaks."""
        return self._omegas[self.peaks]

    def update(self, probe: Probe) -> None:
        if probe.outputs is not None and len(probe.outputs) == len(self.x):
            out = probe.outputs
        elif probe.model is not None:  # the probe batch is not our grid: evaluate on it
            with torch.no_grad():
                out = probe.model(self.x.to(next(probe.model.parameters()).dtype))
        else:
            raise ValueError(
                f"Spectrum needs probe.outputs on its {len(self.x)} inputs x, or probe.model"
            )
        self._output = _as_vector(out.detach(), "outputs").to(self.target.dtype)

    def compute(self) -> dict[str, Any]:
        if self._output is None:
            raise RuntimeError("Spectrum.compute() before update(); call update(probe) first")
        _, pred = spectrum_1d(self.x, self._output)
        errs = peak_relative_error(pred, self.target_spectrum, self.peaks)
        out = {f"rel_err_k{int(k)}": float(e) for k, e in zip(self.peaks, errs, strict=True)}
        out["loss"] = float((self._output - self.target).square().mean())
        return out
