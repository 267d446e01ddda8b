"""Experiment ``frequency-principle``: which frequencies does each optimizer learn first?

Reproduces the set-up of Ma, Xu & Zhang, "Frequency principle in deep learning beyond
gradient-descent-based training" (2021): a 1-hidden-layer network fits a 1-D target on a uniform
grid with SGD, Adam, conjugate gradient, BFGS, L-BFGS, Powell and particle swarm, each from the
same initialization and on the same budget of loss evaluations. On a log-spaced schedule of
evaluations the ``spectrum`` instrument measures, at each frequency peak k of the target, the
relative error ``Delta_k = | |Yhat_k| - |Y_k| | / |Y_k|`` of the best network so far.

A peak *converges* when ``Delta_k < threshold`` (default 0.1) is first reached. The
F-principle holds for an optimizer ("low first") when, for every pair of adjacent peaks, the
lower converges strictly before the higher over the seeds: per seed the pair's effect is
``log10(t_high / t_low)`` of the first-convergence evaluation counts, and the pair holds when
the 95 % interval of that effect over seeds excludes 0 from above (``_stats``). A tie (both
first below the threshold at the same record) is an effect of 0, not support; a pair whose
higher peak never converges within the budget is *censored*: no value, so the prediction
cannot hold (inconclusive); a lower peak that never converges while the higher does is a
reversal, counted as ``log10(t_high / budget)`` (at most 0). Each seed draws the network's
initial weights and the stochastic optimizers' randomness (``seeds``).

    graddyn run frequency-principle --set target=sin14 --set activation=relu
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from graddyn.experiments._base import register_experiment
from graddyn.experiments._config import check_min, config_from_run, set_names
from graddyn.experiments._seeds import check_seeds
from graddyn.experiments._stats import RULE, all_of, effect_verdict, mean_ci
from graddyn.instruments._base import Probe
from graddyn.instruments.spectrum import Spectrum
from graddyn.interventions.gradient_free import METHODS, logspaced_evals, minimize
from graddyn.train import Run

__all__ = [
    "TARGETS",
    "FrequencyPrincipleConfig",
    "first_converged",
    "low_first_verdict",
    "make_network",
    "make_problem",
    "order_effects",
    "report_frequency_principle",
    "run_frequency_principle",
    "summary_rows",
]


@dataclass(frozen=True)
class Target:
    """A 1-D target function on an interval."""

    formula: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    interval: tuple[float, float]


TARGETS: dict[str, Target] = {
    "sin135": Target(
        "sin(x) + sin(3x) + sin(5x)",
        lambda x: torch.sin(x) + torch.sin(3 * x) + torch.sin(5 * x),
        (-math.pi, math.pi),
    ),
    "sin14": Target("sin(x) + sin(4x)", lambda x: torch.sin(x) + torch.sin(4 * x), (-10.0, 10.0)),
}
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}
ALL_OPTIMIZERS = ("sgd", "adam", "cg", "bfgs", "lbfgs", "powell", "pso")


@dataclass(frozen=True)
class FrequencyPrincipleConfig:
    """Every field has a default; ``optimizers`` also accepts a comma-separated string."""

    optimizers: tuple[str, ...] = ALL_OPTIMIZERS
    target: Literal["sin135", "sin14"] = "sin135"  # a key of TARGETS
    activation: Literal["tanh", "relu"] = "tanh"
    width: int = 20  # 1-width-1 network
    n_points: int = 128  # uniform training grid
    max_evals: int = 20_000  # loss evaluations per optimizer
    n_records: int = 40  # log-spaced records of the spectrum
    threshold: float = 0.1  # Delta_k below this = converged
    sgd_lr: float = 0.05
    adam_lr: float = 0.01
    pso_popsize: int = 40
    pso_sigma: float = 0.1
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        set_names(self, "optimizers", METHODS.names())
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; valid: {', '.join(TARGETS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}"
            )
        check_min(self, "width n_points max_evals n_records pso_popsize", 0, above=True)
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}; try 0.1")
        check_seeds(self.seeds)


def make_problem(config: FrequencyPrincipleConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The training grid x (N, 1), uniform with the right end left out, and targets y (N, 1)."""
    target = TARGETS[config.target]
    lo, hi = target.interval
    x = torch.linspace(lo, hi, config.n_points + 1, dtype=torch.float64)[:-1, None]
    return x, target.fn(x)


def make_network(config: FrequencyPrincipleConfig, seed: int) -> nn.Module:
    """A 1-width-1 float64 network with PyTorch's default init, seeded by ``seed``."""
    torch.manual_seed(seed)
    act = ACTIVATIONS[config.activation]
    net = nn.Sequential(nn.Linear(1, config.width), act(), nn.Linear(config.width, 1))
    return net.to(torch.float64)


def _options(config: FrequencyPrincipleConfig, method: str) -> dict[str, Any]:
    return {
        "sgd": {"lr": config.sgd_lr},
        "adam": {"lr": config.adam_lr},
        "pso": {"popsize": config.pso_popsize, "sigma": config.pso_sigma},
    }.get(method, {})


def run_frequency_principle(config: FrequencyPrincipleConfig, run: Run) -> None:
    """Train with every optimizer for every seed; log ``seed<s>/{opt}/rel_err_k{k}`` and
    ``seed<s>/{opt}/loss`` by evaluation.

    Each (seed, optimizer) writes its records when it finishes, ``final_loss`` last, so a
    resumed run skips the pairs that finished and redoes the one that was interrupted.
    """
    x, y = make_problem(config)
    schedule = logspaced_evals(config.max_evals, config.n_records)
    done = set(run.metric_names())
    for seed in config.seeds:
        for method in config.optimizers:
            tag = f"seed{seed}/{method}"
            if f"{tag}/final_loss" in done:  # resumed run: this pair already finished
                continue
            model = make_network(config, seed)  # the same initial point for every optimizer
            spectrum = Spectrum(x, y)

            def monitor(m: nn.Module, spectrum: Spectrum = spectrum) -> dict[str, float]:
                spectrum.update(Probe(model=m))
                return spectrum.compute()

            result = minimize(
                model,
                lambda m: (m(x) - y).square().mean(),
                method,
                max_evals=config.max_evals,
                record_at=schedule,
                monitor=monitor,
                seed=seed,
                options=_options(config, method),
            )
            for rec in result.records:
                run.log(rec.n_evals, {f"{tag}/{k}": v for k, v in rec.metrics.items()})
            run.log(result.n_evals, {f"{tag}/final_loss": result.loss})


def first_converged(evals: np.ndarray, errors: np.ndarray, threshold: float) -> np.ndarray:
    """First evaluation count at which each peak's error is below ``threshold`` (inf: never).

    Shapes: evals (T,), errors (P, T) -> (P,).

    >>> first_converged(np.array([1, 10, 100]), np.array([[0.5, 0.05, 0.0], [1, 1, 1]]), 0.1)
    array([10., inf])
    """
    below = errors < threshold
    hit = below.any(axis=1)
    idx = below.argmax(axis=1)
    return np.where(hit, evals[idx].astype(float), np.inf)


def order_effects(first: Sequence[float], budget: float) -> np.ndarray:
    """Per adjacent pair of peaks (in frequency order): ``log10(t_high / t_low)`` of their
    first-convergence evaluation counts (> 0: the lower first; 0: a tie); NaN when the higher
    never converges (censored) or neither does; ``log10(t_high / budget)`` (<= 0) when only
    the lower never converges (a reversal). Shape (P,) -> (P - 1,).

    >>> order_effects([10, 100, math.inf], 1000).tolist()
    [1.0, nan]
    >>> order_effects([math.inf, 100], 1000).tolist()
    [-1.0]
    """
    t = np.asarray(first, dtype=float)
    lo, hi = t[:-1], t[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log10(hi / lo)
        reversed_ = np.isinf(lo) & np.isfinite(hi)
        out = np.where(reversed_, np.log10(np.minimum(hi / budget, 1.0)), out)
    return np.where(np.isinf(hi), np.nan, out)


def low_first_verdict(first: np.ndarray, budget: float) -> tuple[str, list[str]]:
    """Verdict of "low frequencies converge first" for one optimizer from ``first`` (S, P):
    each seed's first-convergence counts of the P peaks. Every adjacent pair must hold
    (module docstring). Returns (verdict, one "k_i<k_j: estimate" text per pair)."""
    effects = np.array([order_effects(row, budget) for row in np.atleast_2d(first)])
    words, parts = [], []
    for j in range(effects.shape[1]):
        est = mean_ci(effects[:, j])
        words.append(effect_verdict(est, +1))
        censored = int(np.isnan(effects[:, j]).sum())
        parts.append(f"pair {j + 1}: {est}" + (f" ({censored} censored)" if censored else ""))
    return all_of(words), parts


def _peak_table(run: Run, method: str, seed: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(peak indices k (P,), evaluation counts (T,), errors (P, T)) of one optimizer."""
    prefix = f"seed{seed}/{method}/rel_err_k"
    peaks = sorted(int(n[len(prefix) :]) for n in run.metric_names() if n.startswith(prefix))
    if not peaks:
        raise ValueError(f"run {run.dir} has no spectrum records for {method!r}, seed {seed}; "
                         "run it first")
    rows = [run.history(f"{prefix}{k}") for k in peaks]
    evals = np.asarray(rows[0][0])
    return peaks, evals, np.stack([np.asarray(v, dtype=float) for _, v in rows])


def _heatmaps(run: Run, cfg: FrequencyPrincipleConfig, out_dir: Path) -> Path:
    """Errors per peak over evaluations for the first seed, one panel per optimizer."""
    methods = cfg.optimizers
    fig = Figure(figsize=(6, 1.3 + 1.1 * len(methods)), layout="constrained")
    axes = fig.subplots(len(methods), 1, squeeze=False)
    for ax, method in zip(axes[:, 0], methods, strict=True):
        peaks, evals, errors = _peak_table(run, method, cfg.seeds[0])
        mesh = ax.pcolormesh(
            evals, np.arange(len(peaks)), errors, vmin=0, vmax=1, cmap="viridis", shading="nearest"
        )
        ax.set_xscale("log")
        ax.set_yticks(range(len(peaks)), _freq_labels(cfg, peaks))
        ax.set_ylabel(f"{method}\nfreq")
    axes[-1, 0].set_xlabel("loss evaluations")
    fig.colorbar(mesh, ax=axes[:, 0].tolist(), label=r"relative error $\Delta_k$")
    fig.suptitle(f"{TARGETS[cfg.target].formula}, {cfg.activation} 1-{cfg.width}-1 "
                 f"(seed {cfg.seeds[0]})")
    path = out_dir / f"{run.dir.name}_heatmaps.png"
    fig.savefig(path, dpi=110)
    return path


def _freq_labels(cfg: FrequencyPrincipleConfig, peaks: Sequence[int]) -> list[str]:
    """Angular frequency of DFT bin k on the target's interval: 2 pi k / length."""
    lo, hi = TARGETS[cfg.target].interval
    return [f"{2 * math.pi * k / (hi - lo):.2g}" for k in peaks]


def summary_rows(run: Run, cfg: FrequencyPrincipleConfig) -> tuple[list[str], list[list[str]]]:
    """(header, one row per optimizer): median over seeds of the first evaluation count at
    which each peak converged ('-' = never, for most seeds), seeds in which all peaks
    converged, median final loss, and the low-first verdict over seeds with its evidence."""
    header: list[str] = []
    rows = []
    for method in cfg.optimizers:
        firsts, finals = [], []
        for seed in cfg.seeds:
            peaks, evals, errors = _peak_table(run, method, seed)
            firsts.append(first_converged(evals, errors, cfg.threshold))
            finals.append(float(run.history(f"seed{seed}/{method}/final_loss")[1][-1]))
        header = header or ["optimizer", *(f"freq {f}" for f in _freq_labels(cfg, peaks)),
                            "seeds with all peaks converged", "final loss", "low first",
                            "log10(t_high / t_low) per adjacent pair"]
        first = np.array(firsts)
        med = np.median(first, axis=0)
        cells = ["-" if math.isinf(f) else str(int(f)) for f in med]
        word, parts = low_first_verdict(first, cfg.max_evals)
        done = f"{int(np.isfinite(first).all(axis=1).sum())}/{len(first)}"
        rows.append([method, *cells, done, f"{float(np.median(finals)):.2e}", word,
                     "; ".join(parts)])
    return header, rows


def _summary(run: Run, cfg: FrequencyPrincipleConfig, out_dir: Path) -> Path:
    """Write the table as markdown (``*_summary.md``, with the rule) and draw it."""
    header, rows = summary_rows(run, cfg)
    title = f"{TARGETS[cfg.target].formula}, {cfg.activation} 1-{cfg.width}-1"
    note = (f"converged = relative error < {cfg.threshold} first reached (evaluations, median "
            f"over seeds {','.join(map(str, cfg.seeds))}; - = never)")
    lines = [f"# frequency principle: {title}", "", note, "", "**Rule.** " + RULE, "",
             "**Parameters.** low first = every adjacent pair of peaks has log10(t_high / "
             "t_low) > 0 over seeds; a tie is 0; a higher peak that never converges is "
             f"censored (no value); budget {cfg.max_evals} loss evaluations.", ""]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    (out_dir / f"{run.dir.name}_summary.md").write_text("\n".join(lines) + "\n")
    fig = Figure(figsize=(1.1 * len(header) + 4, 0.3 * len(rows) + 0.9), layout="constrained")
    ax = fig.subplots()
    ax.axis("off")
    ax.table(cellText=[r[:-1] for r in rows], colLabels=header[:-1], loc="center")
    ax.set_title(f"{title}\n{note}", fontsize=8)
    path = out_dir / f"{run.dir.name}_summary.png"
    fig.savefig(path, dpi=110)
    return path


def report_frequency_principle(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    """For each run: a heatmap PNG (one panel per optimizer, evaluations on a log axis) and the
    summary table as PNG (returned) and markdown (``{run}_summary.md`` beside it)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for run in runs:
        cfg = config_from_run(FrequencyPrincipleConfig, run)
        paths += [_heatmaps(run, cfg, out_dir), _summary(run, cfg, out_dir)]
    return paths


register_experiment(
    "frequency-principle",
    "Which frequencies SGD, Adam, CG, BFGS, L-BFGS, Powell and PSO learn first (F-principle).",
    FrequencyPrincipleConfig, run_frequency_principle, report_frequency_principle,
    demo=FrequencyPrincipleConfig(max_evals=2000, n_records=20))
