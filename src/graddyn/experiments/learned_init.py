"""Experiment ``learned-init``: start a non-convex solve from a map learned on previous
solutions of related problems, vs random and hand-crafted starts, on held-out instances.

Two families (:class:`graddyn.interventions.learned_init.LearnedInit` for the map):

* ``adv``: l-inf PGD adversarial examples for a small MLP trained on digits. Features: the
  input and a one-hot of its label; solution: the successful perturbation / eps. Starts:
  ``zero`` (plain PGD), ``random`` (uniform in the box), ``class_mean`` (hand-crafted:
  ``eps * sign(mu_c - x)`` towards the nearest other class mean) and ``learned``. Logged:
  ``adv/{start}/success`` (fraction fooled after k PGD steps, k = 0..pgd_steps) and
  ``adv/{start}/mean_iters`` (failures count as pgd_steps + 1).
* ``sine``: fitting ``A sin(x + phi)`` with a 1-20-1 tanh net (Adam). Features
  ``(A cos phi, A sin phi)``; solution: the trained weights, all solved from one shared start.
  Starts: ``random`` (fresh PyTorch default init), ``mean`` (hand-crafted: the average previous
  solution) and ``learned``. Logged: ``sine/{start}/loss`` (median over held-out tasks) by step,
  ``sine/{start}/median_steps`` to ``target_loss`` (failures count as budget + 1) and
  ``sine/{start}/reached``.

    graddyn run learned-init --set regressor=mlp
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graddyn.experiments._base import register_experiment
from graddyn.experiments._config import check_min
from graddyn.experiments._seeds import SeedRun, check_seeds, each_seed_once, load_study_data
from graddyn.experiments._stats import effect_verdict, mean_ci, paired_diff
from graddyn.experiments._verdicts import Verdict, write_verdicts
from graddyn.interventions.adversarial import pgd, random_start
from graddyn.interventions.learned_init import REGRESSORS, LearnedInit, steps_to_target
from graddyn.models import build_model
from graddyn.train import Run, new_figure, save_figure

__all__ = [
    "LearnedInitConfig", "class_mean_start", "report_learned_init", "run_learned_init",
    "sine_net", "sine_task",
]

ADV_STARTS = ("zero", "random", "class_mean", "learned")
SINE_STARTS = ("random", "mean", "learned")


@dataclass(frozen=True)
class LearnedInitConfig:
    regressor: str = "ridge"  # "ridge" or "mlp"
    preprocess: Literal["scale", "standardize"] = "standardize"  # the digits classifier's
    alpha: float = 1.0  # regressor L2 penalty
    # adversarial examples on digits
    clf_width: int = 64
    clf_steps: int = 150
    eps: float = 0.3  # l-inf radius in standardised pixel units
    pgd_steps: int = 20
    n_fit: int = 600  # solved instances the map learns from
    n_eval: int = 300  # held-out instances
    # sinusoid regression family
    n_tasks_fit: int = 30
    n_tasks_eval: int = 12
    sine_width: int = 20
    sine_lr: float = 0.01
    solve_steps: int = 400  # Adam steps to solve a training task
    budget: int = 300  # Adam steps on a held-out task
    target_loss: float = 0.01
    seeds: tuple[int, ...] = (0, 1, 2)  # each: classifier, instances, tasks, inits

    @property
    def seed(self) -> int:
        """The seed of a one-seed view (``replace(cfg, seeds=(s,))``); the first otherwise."""
        return self.seeds[0]

    def __post_init__(self) -> None:
        if self.regressor not in REGRESSORS:
            raise ValueError(
                f"unknown regressor {self.regressor!r}; valid: {', '.join(REGRESSORS)}")
        check_min(self, "clf_width clf_steps pgd_steps n_fit n_eval "
                  "n_tasks_fit n_tasks_eval sine_width solve_steps budget", 0, above=True)
        if self.n_tasks_fit < 2 or self.n_fit < 2:
            raise ValueError("n_fit and n_tasks_fit must be >= 2 (the map needs examples)")
        if self.eps <= 0 or self.sine_lr <= 0 or self.target_loss <= 0:
            raise ValueError("eps, sine_lr and target_loss must be > 0")
        check_seeds(self.seeds)


def run_learned_init(cfg: LearnedInitConfig, run: Run) -> None:
    """Both families for every seed (metrics under ``seed<s>/``); see the module doc. A
    resumed run redoes an unfinished seed."""

    def work(seed: int, view: SeedRun) -> None:
        one = replace(cfg, seeds=(seed,))
        _run_adversarial(one, view)
        _run_sine(one, view)

    each_seed_once(run, cfg.seeds, work)


# ----- family (a): PGD adversarial examples -------------------------------------------------

def _train_classifier(cfg: LearnedInitConfig) -> tuple[nn.Module, object]:
    data = load_study_data("digits", "", cfg.preprocess)
    torch.manual_seed(cfg.seed)
    dtype = torch.get_default_dtype()
    model = build_model("mlp", data.input_shape, data.num_classes, width=cfg.clf_width).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = data.train_x.to(dtype), data.train_y
    for _ in range(cfg.clf_steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.requires_grad_(False)
    return model, data


def class_mean_start(x: Tensor, y: Tensor, means: Tensor, eps: float) -> Tensor:
    """Hand-crafted l-inf start ``eps * sign(mu_c - x)``, ``c`` the nearest class mean other
    than ``y``. x (B, ...), means (K, ...) -> (B, ...)."""
    dist = (x.flatten(1)[:, None] - means.flatten(1)[None]).norm(dim=2)  # (B, K)
    dist[torch.arange(len(y)), y] = math.inf
    return eps * torch.sign(means[dist.argmin(1)] - x)


def _features(x: Tensor, y: Tensor, k: int) -> Tensor:
    return torch.cat([x.flatten(1), F.one_hot(y, k).to(x.dtype)], dim=1)


def _correct(model: nn.Module, x: Tensor, y: Tensor, n: int, g: torch.Generator
             ) -> tuple[Tensor, Tensor]:
    """Up to ``n`` random examples the model classifies correctly."""
    with torch.no_grad():
        keep = (model(x).argmax(1) == y).nonzero().squeeze(1)
    keep = keep[torch.randperm(len(keep), generator=g)[:n]]
    return x[keep], y[keep]


def _run_adversarial(cfg: LearnedInitConfig, run: Run) -> None:
    model, data = _train_classifier(cfg)
    dtype = torch.get_default_dtype()
    g = torch.Generator().manual_seed(cfg.seed)
    # previous instances: training digits; held-out instances: test digits (correct ones only)
    x_fit, y_fit = _correct(model, data.train_x.to(dtype), data.train_y, cfg.n_fit, g)
    x, y = _correct(model, data.test_x.to(dtype), data.test_y, cfg.n_eval, g)
    alpha = 2.5 * cfg.eps / cfg.pgd_steps
    solved = pgd(model, x_fit, y_fit, cfg.eps, "linf", cfg.pgd_steps, alpha)
    ok = solved.first_success >= 0
    if ok.sum() < 2:
        raise ValueError(f"PGD solved only {int(ok.sum())} of {len(ok)} previous instances, too "
                         "few to learn from; raise eps or pgd_steps")
    k = data.num_classes
    init = LearnedInit(cfg.regressor, cfg.alpha, seed=cfg.seed).fit(
        _features(x_fit[ok], y_fit[ok], k), solved.delta[ok] / cfg.eps)
    means = torch.stack([data.train_x[data.train_y == c].mean(0) for c in range(k)]).to(dtype)
    starts = {
        "zero": torch.zeros_like(x),
        "random": random_start(x.shape, cfg.eps, "linf", generator=g).to(dtype),
        "class_mean": class_mean_start(x, y, means, cfg.eps),
        "learned": cfg.eps * init.predict(_features(x, y, k)).clamp(-1, 1),
    }
    run.log(0, {"adv/fit_solved": float(ok.float().mean()), "adv/n_eval": float(len(y))})
    for name, delta0 in starts.items():
        first = pgd(model, x, y, cfg.eps, "linf", cfg.pgd_steps, alpha, delta0=delta0).first_success
        for step in range(cfg.pgd_steps + 1):
            rate = float(((first >= 0) & (first <= step)).float().mean())
            run.log(step, {f"adv/{name}/success": rate})
        iters = torch.where(first >= 0, first, cfg.pgd_steps + 1).double()
        run.log(cfg.pgd_steps, {f"adv/{name}/mean_iters": float(iters.mean())})


# ----- family (b): a family of sinusoid regression tasks -------------------------------------

def sine_task(amplitude: float, phase: float, n_points: int = 32) -> tuple[Tensor, Tensor]:
    """Grid x (N, 1) on [-pi, pi) and targets ``A sin(x + phi)`` (N, 1)."""
    x = torch.linspace(-math.pi, math.pi, n_points + 1)[:-1, None]
    return x, amplitude * torch.sin(x + phase)


def sine_net(width: int) -> nn.Module:
    """1-width-1 tanh network in the default dtype."""
    return nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, 1))


def _train(net: nn.Module, theta0: Tensor, x: Tensor, y: Tensor, lr: float, steps: int
           ) -> tuple[Tensor, list[float]]:
    """Adam from flat parameters ``theta0``; returns (final parameters, loss before each step
    and at the end (steps + 1,))."""
    nn.utils.vector_to_parameters(theta0.clone(), net.parameters())
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (net(x) - y).square().mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append(float((net(x) - y).square().mean()))
    return nn.utils.parameters_to_vector(net.parameters()).detach(), losses


def _task_params(n: int, g: torch.Generator) -> Tensor:
    """(n, 2) amplitudes in [0.5, 2] and phases in [0, 2 pi)."""
    return torch.stack([0.5 + 1.5 * torch.rand(n, generator=g),
                        2 * math.pi * torch.rand(n, generator=g)], dim=1).to(torch.float64)


def _sine_features(params: Tensor) -> Tensor:
    a, phi = params[:, 0], params[:, 1]
    return torch.stack([a * torch.cos(phi), a * torch.sin(phi)], dim=1)


def _run_sine(cfg: LearnedInitConfig, run: Run) -> None:
    g = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed)
    net = sine_net(cfg.sine_width)
    theta0 = nn.utils.parameters_to_vector(net.parameters()).detach().clone()
    fit_params, eval_params = _task_params(cfg.n_tasks_fit, g), _task_params(cfg.n_tasks_eval, g)
    solutions = torch.stack([
        _train(net, theta0, *sine_task(float(a), float(p)), cfg.sine_lr, cfg.solve_steps)[0]
        for a, p in fit_params])
    init = LearnedInit(cfg.regressor, cfg.alpha, seed=cfg.seed).fit(
        _sine_features(fit_params), solutions)
    learned = init.predict(_sine_features(eval_params)).to(theta0.dtype)
    curves: dict[str, list[list[float]]] = {s: [] for s in SINE_STARTS}
    for i, (a, p) in enumerate(eval_params):
        torch.manual_seed(cfg.seed + 1000 + i)
        fresh = nn.utils.parameters_to_vector(sine_net(cfg.sine_width).parameters()).detach()
        starts = {"random": fresh, "mean": init.mean_solution(), "learned": learned[i]}
        for name, theta in starts.items():
            x, y = sine_task(float(a), float(p))
            curves[name].append(_train(net, theta, x, y, cfg.sine_lr, cfg.budget)[1])
    _log_sine(cfg, run, curves)


def _log_sine(cfg: LearnedInitConfig, run: Run, curves: dict[str, list[list[float]]]) -> None:
    record = sorted({0, cfg.budget} | {int(v) for v in np.logspace(0, math.log10(cfg.budget), 25)})
    for name, rows in curves.items():
        med = np.median(np.asarray(rows), axis=0)  # (budget + 1,)
        for t in record:
            run.log(t, {f"sine/{name}/loss": float(med[t])})
        hit = [steps_to_target(r, cfg.target_loss) for r in rows]
        steps = [h if h >= 0 else cfg.budget + 1 for h in hit]
        run.log(cfg.budget, {f"sine/{name}/median_steps": float(np.median(steps)),
                             f"sine/{name}/reached": float(np.mean([h >= 0 for h in hit]))})


# ----- report -------------------------------------------------------------------------------

def verdicts(adv: dict[str, np.ndarray], sine: dict[str, np.ndarray]) -> list[Verdict]:
    """Learned starts against the others, from per-seed values (``start -> (S,)``): PGD mean
    iterations to fool (lower is better) and median Adam steps to the target loss."""
    rows = []
    for family, values, unit in (("PGD attacks on digits", adv, "mean PGD iterations"),
                                 ("sinusoid regression", sine, "median Adam steps")):
        for other in (k for k in values if k != "learned"):
            est = paired_diff(values["learned"], values[other])
            rows.append(Verdict(f"{family}: a learned start needs fewer steps than {other}",
                                effect_verdict(est, -1), f"{unit}, learned "
                                f"{mean_ci(values['learned'])}, {other} "
                                f"{mean_ci(values[other])}; difference {est}",
                                "learned - other < 0 (paired by seed)"))
    return rows


def report_learned_init(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    """Per run: PGD success rate vs iterations per start; median held-out loss vs Adam steps
    (first seed); ``<run>_verdict.md`` / ``.json`` over the seeds."""
    out_dir = Path(out_dir)
    paths = []
    for run in runs:
        seeds = run.config.get("seeds") or []
        views = [SeedRun(run, s) for s in seeds]
        if not views or "adv/zero/success" not in views[0].metric_names():
            raise ValueError(f"run {run.dir} has no learned-init records; run it first")
        paths.append(_figure(views[0], run.config.get("target_loss", 0.01),
                             out_dir / f"{run.dir.name}_learned_init.png"))
        adv = {n: np.array([v.history(f"adv/{n}/mean_iters")[1][-1] for v in views])
               for n in ADV_STARTS}
        sine = {n: np.array([v.history(f"sine/{n}/median_steps")[1][-1] for v in views])
                for n in SINE_STARTS}
        write_verdicts(out_dir, verdicts(adv, sine), {"seeds": ",".join(map(str, seeds))},
                       f"{run.dir.name}_verdict")
    return paths


def _figure(run: SeedRun, target: float, path: Path) -> Path:
    fig, axes = new_figure(1, 2, size=(4.3, 3.3))
    for name in ADV_STARTS:
        _, iters = run.history(f"adv/{name}/mean_iters")
        axes[0, 0].plot(*run.history(f"adv/{name}/success"), marker=".",
                        label=f"{name} (mean iters {iters[-1]:.1f})")
    axes[0, 0].set(xlabel="PGD iterations", ylabel="fraction fooled (held out)",
                   title=f"adversarial examples, digits MLP (seed {run.seed})")
    for name in SINE_STARTS:
        _, med = run.history(f"sine/{name}/median_steps")
        steps, vals = run.history(f"sine/{name}/loss")
        axes[0, 1].loglog(np.maximum(steps, 1), vals, label=f"{name} (median {med[-1]:.0f})")
    axes[0, 1].axhline(target, color="k", ls=":", lw=0.8)
    axes[0, 1].set(xlabel="Adam step", ylabel="median MSE (held-out tasks)",
                   title="sinusoid family, steps to target")
    for ax in axes[0]:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


register_experiment(
    "learned-init",
    "Learned vs random vs hand-crafted starts: PGD attacks on digits, sinusoid regression.",
    LearnedInitConfig, run_learned_init, report_learned_init,
    demo=LearnedInitConfig(n_fit=200, n_eval=100, n_tasks_fit=10, n_tasks_eval=4))
