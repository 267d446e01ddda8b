"""Experiment ``adversarial-bias``: the implicit bias of adversarial training on separable data.

Li, Fang, Xu & Zhao (ICLR 2020): full-batch GD adversarial training of a linear classifier on
linearly separable data converges in direction to the l2 max-margin classifier at rate
``O(1/sqrt T)`` with l2-bounded perturbations (``eps`` below the margin), much faster than the
``O(1/log T)`` of clean GD; with l-inf perturbations it converges to the max mixed-norm margin
direction ``argmax_{|u|_2=1} min_i y_i <u, x_i> - eps |u|_1``. The worst case is exact
(closed form), the target directions come from SciPy's SLSQP
(:func:`graddyn.instruments.margin.max_margin_direction`).

Second part (Lyu & Zhu, ICLR 2022 set-up): a 2-homogeneous two-layer ReLU network
``f(x) = sum_j a_j relu(<w_j, x>)`` trained by GD on PGD (l2) adversarial examples; we log its
normalised robust margin ``min_i y_i f(x_i + delta_i) / |theta|_2^2`` over training.

Every seed of ``seeds`` draws its own separable data set and network (metrics prefixed
``seed<s>/``); the report's verdicts are over seeds with the rules of ``_stats``.

    graddyn run adversarial-bias --set steps=20000 --set eps_frac=0.8
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from graddyn.data import load_dataset
from graddyn.experiments._base import register_experiment
from graddyn.experiments._config import check_min, config_from_run
from graddyn.experiments._seeds import SeedRun, check_seeds, each_seed_once
from graddyn.experiments._stats import effect_verdict, mean_ci, paired_diff
from graddyn.experiments._verdicts import Verdict, departures, write_verdicts
from graddyn.instruments.margin import (
    angle,
    linf_margin,
    max_margin_direction,
    network_margin,
    normalized_margin,
    robust_margin,
)
from graddyn.interventions.adversarial import LOSSES, adversarial_gd_linear, margin_loss, pgd
from graddyn.train import Run, new_figure, save_figure

__all__ = [
    "AdversarialBiasConfig",
    "loglog_slope",
    "report_adversarial_bias",
    "run_adversarial_bias",
    "two_layer_relu",
]

VARIANTS = ("clean", "l2", "linf")


@dataclass(frozen=True)
class AdversarialBiasConfig:
    """``eps_frac``: attack radius as a fraction of the largest one that keeps the data robustly
    separable (the l2 max margin for l2, :func:`linf_margin` for l-inf)."""

    n_train: int = 100
    dim: int = 5
    data_margin: float = 0.5
    loss: str = "logistic"  # "logistic" or "exponential"
    lr: float = 10.0
    steps: int = 20_000
    n_records: int = 30
    eps_frac: float = 0.95  # the O(1/sqrt T) regime needs eps close to the margin
    step_rule: str = "constant"  # or "normalized" (lr / loss)
    network: bool = True
    net_width: int = 20
    net_steps: int = 600
    net_lr: float = 0.2
    net_eps_frac: float = 0.5
    pgd_steps: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        check_min(self, "n_train dim steps n_records net_width net_steps", 0, above=True)
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        if self.step_rule not in ("constant", "normalized"):
            raise ValueError(
                f"step_rule must be 'constant' or 'normalized', got {self.step_rule!r}")
        for name in ("eps_frac", "net_eps_frac"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1) (attack below the margin), try 0.5")
        if self.lr <= 0 or self.net_lr <= 0:
            raise ValueError("lr and net_lr must be > 0")
        check_seeds(self.seeds)


def _data(cfg: AdversarialBiasConfig, seed: int) -> tuple[Tensor, Tensor]:
    d = load_dataset("separable", n_train=cfg.n_train, n_test=1, dim=cfg.dim,
                     margin=cfg.data_margin, seed=seed)
    return d.train_x.double(), d.train_y


def _records(steps: int, n: int) -> list[int]:
    return sorted({int(v) for v in np.logspace(0, math.log10(steps), n).round()})


def run_adversarial_bias(cfg: AdversarialBiasConfig, run: Run) -> None:
    """For every seed, log ``seed<s>/{clean,l2,linf}/angle`` (to each variant's target
    direction), ``linf/angle_l2``, ``*/margin`` and ``*/robust_margin`` at log-spaced steps;
    then the network part. A resumed run redoes an unfinished seed."""
    each_seed_once(run, cfg.seeds, lambda seed, view: _run_seed(cfg, view, seed))


def _run_seed(cfg: AdversarialBiasConfig, run: SeedRun, seed: int) -> None:
    x, y = _data(cfg, seed)
    u_l2 = max_margin_direction(x, y)
    gamma, gamma_inf = float(normalized_margin(u_l2, x, y)), linf_margin(x, y)
    eps = {"clean": 0.0, "l2": cfg.eps_frac * gamma, "linf": cfg.eps_frac * gamma_inf}
    u_inf = max_margin_direction(x, y, eps=eps["linf"], norm="linf")
    target = {"clean": u_l2, "l2": u_l2, "linf": u_inf}
    run.log(0, {"l2_max_margin": gamma, "linf_max_margin": gamma_inf, "eps_l2": eps["l2"],
                "eps_linf": eps["linf"], "angle_l2_vs_mixed": angle(u_l2, u_inf)})
    run.log_array("u_l2", u_l2.numpy())
    run.log_array("u_mixed", u_inf.numpy())
    records = _records(cfg.steps, cfg.n_records)
    for variant in VARIANTS:
        norm = "linf" if variant == "linf" else "l2"
        traj = adversarial_gd_linear(x, y, eps[variant], norm, steps=cfg.steps, lr=cfg.lr,
                                     loss=cfg.loss, record_at=records, step_rule=cfg.step_rule)
        for t, w in traj:
            row = {f"{variant}/angle": angle(w, target[variant]),
                   f"{variant}/margin": float(normalized_margin(w, x, y)),
                   f"{variant}/robust_margin": float(robust_margin(w, x, y, eps[variant], norm))}
            if variant == "linf":
                row["linf/angle_l2"] = angle(w, u_l2)
            run.log(t, row)
        steps, angles = run.history(f"{variant}/angle")
        run.log(cfg.steps, {f"{variant}/loglog_slope": loglog_slope(steps, angles)})
    if cfg.network:
        _run_network(cfg, x, y, cfg.net_eps_frac * gamma, run, seed)


def loglog_slope(steps: np.ndarray, values: np.ndarray, decades: float = 1.0) -> float:
    """Least-squares slope of ``log value`` against ``log step`` over the last ``decades``
    (-0.5 for ``1/sqrt T``; ``1/log T`` has slope ``-1/log T``, about -0.1 near T = 1e4).

    >>> t = np.array([10.0, 100.0, 1000.0]); round(loglog_slope(t, t**-0.5), 6)
    -0.5
    """
    steps, values = np.asarray(steps, float), np.asarray(values, float)
    keep = (steps >= steps.max() / 10**decades) & (steps > 0) & (values > 0)
    if keep.sum() < 2:
        return math.nan
    return float(np.polyfit(np.log(steps[keep]), np.log(values[keep]), 1)[0])


def two_layer_relu(dim: int, width: int) -> nn.Module:
    """``f(x) = sum_j a_j relu(<w_j, x>)`` without biases (2-homogeneous in its weights).

    >>> two_layer_relu(3, 4)(torch.zeros(2, 3, dtype=torch.float64)).shape
    torch.Size([2, 1])
    """
    return nn.Sequential(nn.Linear(dim, width, bias=False), nn.ReLU(),
                         nn.Linear(width, 1, bias=False)).double()


def _run_network(cfg: AdversarialBiasConfig, x: Tensor, y: Tensor, eps: float,
                 run: SeedRun, seed: int) -> None:
    """GD on the logistic loss at l2 PGD examples; log the normalised robust and clean margins."""
    torch.manual_seed(seed)
    net = two_layer_relu(cfg.dim, cfg.net_width)
    ys = 2.0 * y.double() - 1.0
    opt = torch.optim.SGD(net.parameters(), lr=cfg.net_lr)
    log_at = set(_records(cfg.net_steps, cfg.n_records)) | {0}
    for t in range(cfg.net_steps + 1):
        delta = pgd(net, x, y, eps, "l2", steps=cfg.pgd_steps).delta
        out_adv = net(x + delta).squeeze(1)
        loss = margin_loss(ys * out_adv, cfg.loss).mean()
        if t in log_at:
            with torch.no_grad():
                run.log(t, {"net/robust_margin": float(network_margin(out_adv, y, net, 2)),
                            "net/clean_margin": float(network_margin(net(x).squeeze(1), y, net, 2)),
                            "net/adv_loss": float(loss)})
        if t == cfg.net_steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()


def _theory(ax, steps: np.ndarray, values: np.ndarray, rate: str, **style) -> None:
    """Draw ``c / sqrt T`` or ``c / log T`` for T >= 10 through the curve's last point, so the
    slopes can be compared where the asymptotics should hold."""
    i = int(np.argmax(steps >= 10))
    t = steps[i:].astype(float)
    f = (lambda s: 1 / np.sqrt(s)) if rate == "sqrt" else (lambda s: 1 / np.log(s))
    ax.plot(t, values[-1] * f(t) / f(t[-1]), **style)


RATE_MARGIN = 0.1  # (2) the l2 slope counts as the O(1/sqrt T) rate below -0.5 + this


def _last(run: Run, name: str) -> np.ndarray:
    """(S,) the last value of ``seed<s>/name`` of every seed."""
    return np.array([run.history(f"seed{s}/{name}")[1][-1] for s in run.config["seeds"]],
                    float)


def verdicts(slope_clean: np.ndarray, slope_l2: np.ndarray, angle_mixed: np.ndarray,
             angle_l2: np.ndarray, net_gain: np.ndarray | None) -> list[Verdict]:
    """Li et al.'s and Lyu & Zhu's claims from per-seed values (S,) each: log-log slopes of
    the angle over the last decade (clean, l2 adversarial), final angles of the l-inf run
    to the mixed-norm and to the l2 max-margin direction, and the network's gain in
    normalised robust margin (None: not trained)."""
    faster = paired_diff(slope_l2, slope_clean)
    rate = mean_ci(slope_l2 + 0.5 - RATE_MARGIN)
    mixed = paired_diff(angle_mixed, angle_l2)
    rows = [
        Verdict("(1) l2 adversarial GD converges in direction faster than clean GD",
                effect_verdict(faster, -1), f"log-log slope of the angle, last decade: l2 "
                f"{mean_ci(slope_l2)}, clean {mean_ci(slope_clean)}; difference {faster}",
                "slope l2 - slope clean < 0 (paired by seed)"),
        Verdict("(2) the l2 adversarial angle falls at the O(1/sqrt T) rate",
                effect_verdict(rate, -1), f"slope {mean_ci(slope_l2)}",
                f"slope < -0.5 + {RATE_MARGIN}"),
        Verdict("(3) l-inf adversarial GD converges to the max mixed-norm margin direction, "
                "not the l2 one", effect_verdict(mixed, -1), f"final angle to the mixed-norm "
                f"direction {mean_ci(angle_mixed)}, to the l2 one {mean_ci(angle_l2)}; "
                f"difference {mixed}", "angle to mixed - angle to l2 < 0 (paired by seed)")]
    if net_gain is not None:
        rows.append(Verdict("(4) the network's normalised robust margin grows under "
                            "adversarial training", effect_verdict(mean_ci(net_gain), +1),
                            f"final - initial normalised robust margin {mean_ci(net_gain)}",
                            "gain > 0"))
    return rows


def report_adversarial_bias(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    """Per run: angle to the target direction vs step (log-log, with O(1/sqrt T) and
    O(1/log T) drawn; first seed) and, if trained, the network's normalised margins; and
    ``<run>_verdict.md`` / ``.json`` over the seeds."""
    out_dir = Path(out_dir)
    paths = []
    for run in runs:
        cfg = config_from_run(AdversarialBiasConfig, run)
        first = SeedRun(run, cfg.seeds[0])
        if f"seed{cfg.seeds[0]}/clean/angle" not in run.metric_names():
            raise ValueError(f"run {run.dir} has no angle records; run it first")
        paths.append(_figure(first, cfg, out_dir / f"{run.dir.name}_adversarial_bias.png"))
        gain = None
        if cfg.network:
            gain = np.array([np.subtract(*run.history(f"seed{s}/net/robust_margin")[1][[-1, 0]])
                             for s in cfg.seeds])
        rows = verdicts(_last(run, "clean/loglog_slope"), _last(run, "l2/loglog_slope"),
                        _last(run, "linf/angle"), _last(run, "linf/angle_l2"), gain)
        write_verdicts(out_dir, rows, {
            "seeds": ",".join(map(str, cfg.seeds)), "steps": cfg.steps,
            "eps": f"{cfg.eps_frac} x margin", "rate margin": RATE_MARGIN,
            "differs from the study's default config": departures(run.config,
                                                                  AdversarialBiasConfig())},
            f"{run.dir.name}_verdict")
    return paths


def _figure(run: SeedRun, cfg: AdversarialBiasConfig, path: Path) -> Path:
    fig, axes = new_figure(1, 2 if cfg.network else 1, size=(4.6, 3.6))
    ax = axes[0, 0]
    for variant, color in zip(VARIANTS, ("C0", "C1", "C2"), strict=True):
        steps, vals = run.history(f"{variant}/angle")
        label = {"clean": "clean GD -> l2 max margin", "l2": "l2 adv. -> l2 max margin",
                 "linf": "linf adv. -> mixed-norm margin"}[variant]
        ax.loglog(steps, vals, color=color, label=label)
    _theory(ax, *run.history("l2/angle"), "sqrt", color="C1", ls=":", label="O(1/sqrt T)")
    _theory(ax, *run.history("clean/angle"), "log", color="C0", ls=":", label="O(1/log T)")
    ax.set(xlabel="GD step T", ylabel="angle (rad)",
           title=f"direction convergence (seed {cfg.seeds[0]})")
    ax.legend(fontsize=7)
    if cfg.network:
        ax = axes[0, 1]
        for name in ("robust_margin", "clean_margin"):
            steps, vals = run.history(f"net/{name}")
            ax.semilogx(np.maximum(steps, 1), vals, label=name.replace("_", " "))
        ax.set(xlabel="GD step", ylabel=r"min margin / $|\theta|^2$",
               title="2-layer ReLU, l2 PGD adv. training")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


register_experiment(
    "adversarial-bias",
    "Adversarial GD on separable data converges to the (mixed-norm) max-margin direction.",
    AdversarialBiasConfig, run_adversarial_bias, report_adversarial_bias,
    demo=AdversarialBiasConfig(steps=2000, net_steps=100))
