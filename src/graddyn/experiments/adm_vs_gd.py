"""Experiment ``adm-vs-gd``: ADM (graph cuts) vs gradient descent on a regularised
segmentation loss (Marin, Tang, Ayed, Boykov et al., CVPR 2019).

Weak supervision: scribbles on synthetic shape images (:mod:`graddyn.experiments._shapes`).
Loss: partial cross-entropy on scribbles + ``lam`` * relaxed contrast-sensitive Potts term
(:func:`graddyn.interventions.adm.regularized_loss`). Both methods start from the same small
fully convolutional network, first trained ``warmup_steps`` on the partial cross-entropy alone
(as in the paper), and take the same number of network steps:

* GD: Adam on the regularised loss.
* ADM: every ``inner_steps`` network steps, solve for discrete labels with an s-t min cut
  (Potts + ``-log S`` proximity, scribbles fixed), then Adam on cross-entropy to those labels.

Logged every outer iteration (``t`` = network steps): ``{gd,adm}/miou`` against the full
ground-truth masks, ``{gd,adm}/reg_loss`` (the relaxed regularised loss of the network) and
``adm/labels_miou`` (the cut's labels).

    graddyn run adm-vs-gd --set lam=1.0 --set outer=30
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graddyn.experiments._base import register_experiment
from graddyn.experiments._config import check_min, config_from_run
from graddyn.experiments._seeds import SeedRun, check_seeds, each_seed_once
from graddyn.experiments._shapes import ShapesData, make_shapes
from graddyn.experiments._stats import effect_verdict, mean_ci, paired_diff
from graddyn.experiments._verdicts import Verdict, write_verdicts
from graddyn.interventions.adm import (
    adm_labels,
    contrast_weights,
    grid_edges,
    mean_iou,
    partial_cross_entropy,
    regularized_loss,
)
from graddyn.train import Run, new_figure, save_figure

__all__ = ["AdmVsGdConfig", "fcn", "report_adm_vs_gd", "run_adm_vs_gd"]


@dataclass(frozen=True)
class AdmVsGdConfig:
    n_images: int = 12
    size: int = 24
    noise: float = 0.3
    sigma: float = 0.3  # contrast sensitivity of the Potts weights
    lam: float = 2.0  # weight of the Potts term
    proximity: float = 1.0  # ADM: weight of -log S against lam * Potts in the cut
    width: int = 16  # FCN channels
    lr: float = 0.02
    warmup_steps: int = 30
    outer: int = 20  # ADM iterations (GD logs at the same step counts)
    inner_steps: int = 10  # network steps per ADM iteration
    seeds: tuple[int, ...] = (0, 1, 2)  # each draws its own images, scribbles and network

    @property
    def seed(self) -> int:
        """The seed of a one-seed view (``replace(cfg, seeds=(s,))``); the first otherwise."""
        return self.seeds[0]

    def __post_init__(self) -> None:
        check_min(self, "n_images width outer inner_steps", 0, above=True)
        if self.size < 12:
            raise ValueError(f"size must be >= 12, got {self.size}")
        if self.warmup_steps < 0 or self.lam < 0 or min(self.sigma, self.lr, self.proximity) <= 0:
            raise ValueError("need warmup_steps >= 0, lam >= 0, sigma, lr, proximity > 0")
        check_seeds(self.seeds)


def fcn(width: int) -> nn.Module:
    """Fully convolutional 1 -> 2 channel net, dilations 1, 2, 4 (receptive field 15 px);
    reflect padding, so that the border gives no position cue.

    >>> fcn(4)(torch.zeros(1, 1, 12, 12)).shape
    torch.Size([1, 2, 12, 12])
    """
    layers: list[nn.Module] = []
    c_in = 1
    for dil in (1, 2, 4):
        layers += [nn.Conv2d(c_in, width, 3, padding=dil, dilation=dil,
                             padding_mode="reflect"), nn.ReLU()]
        c_in = width
    layers.append(nn.Conv2d(width, 2, 1))
    return nn.Sequential(*layers)


def _evaluate(net: nn.Module, data: ShapesData, edges, weights: Tensor, lam: float
              ) -> dict[str, float]:
    with torch.no_grad():
        logits = net(data.images)
        return {"miou": mean_iou(logits.argmax(1), data.masks),
                "reg_loss": float(regularized_loss(logits, data.scribbles, edges, weights, lam))}


def _cut_labels(net: nn.Module, data: ShapesData, edges, weights: Tensor, lam: float,
                proximity: float) -> Tensor:
    """ADM step (i) for every image -> labels (B, H, W)."""
    with torch.no_grad():
        logp = net(data.images).log_softmax(1)
    b, _, h, w = logp.shape
    labels = [adm_labels(logp[i].reshape(2, -1), data.scribbles[i].flatten(), edges, weights[i],
                         lam, proximity) for i in range(b)]
    return torch.stack(labels).view(b, h, w)


def run_adm_vs_gd(cfg: AdmVsGdConfig, run: Run) -> None:
    """For every seed (metrics under ``seed<s>/``): warm up on partial CE, then GD and ADM
    from the same network; see module doc. A resumed run redoes an unfinished seed."""
    each_seed_once(run, cfg.seeds, lambda seed, view: _run_seed(replace(cfg, seeds=(seed,)),
                                                                view))


def _run_seed(cfg: AdmVsGdConfig, run: SeedRun) -> None:
    data = make_shapes(cfg.n_images, cfg.size, noise=cfg.noise, seed=cfg.seed)
    edges = grid_edges(cfg.size, cfg.size)
    weights = torch.stack([contrast_weights(im, edges, cfg.sigma) for im in data.images])
    torch.manual_seed(cfg.seed)
    base = fcn(cfg.width).to(data.images.dtype)
    opt = torch.optim.Adam(base.parameters(), lr=cfg.lr)
    n_scribbled = int((data.scribbles >= 0).sum())
    for _ in range(cfg.warmup_steps):
        opt.zero_grad()
        (partial_cross_entropy(base(data.images), data.scribbles) / n_scribbled).backward()
        opt.step()
    start = _evaluate(base, data, edges, weights, cfg.lam)
    run.log(0, {f"{m}/{k}": v for m in ("gd", "adm") for k, v in start.items()})
    for method in ("gd", "adm"):
        net = fcn(cfg.width).to(data.images.dtype)
        net.load_state_dict(base.state_dict())
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        for it in range(1, cfg.outer + 1):
            extra = _outer_iteration(method, net, opt, data, edges, weights, cfg)
            row = {**_evaluate(net, data, edges, weights, cfg.lam), **extra}
            run.log(it * cfg.inner_steps, {f"{method}/{k}": v for k, v in row.items()})


def _outer_iteration(method: str, net: nn.Module, opt: torch.optim.Optimizer, data: ShapesData,
                     edges, weights: Tensor, cfg: AdmVsGdConfig) -> dict[str, float]:
    """``inner_steps`` network steps of GD on the regularised loss, or one ADM iteration."""
    labels = None
    if method == "adm":
        labels = _cut_labels(net, data, edges, weights, cfg.lam, cfg.proximity)
    for _ in range(cfg.inner_steps):
        opt.zero_grad()
        logits = net(data.images)
        if labels is None:
            loss = regularized_loss(logits, data.scribbles, edges, weights, cfg.lam)
        else:
            loss = F.cross_entropy(logits, labels)
        loss.backward()
        opt.step()
    return {} if labels is None else {"labels_miou": mean_iou(labels, data.masks)}


def verdicts(miou: dict[str, np.ndarray], reg: dict[str, np.ndarray]) -> list[Verdict]:
    """Marin et al.'s claim from per-seed end values (``method -> (S,)``): ADM reaches a
    lower regularised loss and a higher mIoU than GD on the same loss."""
    loss = paired_diff(reg["adm"], reg["gd"])
    seg = paired_diff(miou["adm"], miou["gd"])
    return [Verdict("ADM reaches a lower regularised loss than GD", effect_verdict(loss, -1),
                    f"end regularised loss ADM {mean_ci(reg['adm'])}, GD {mean_ci(reg['gd'])}; "
                    f"difference {loss}", "ADM - GD < 0 (paired by seed)"),
            Verdict("ADM segments better than GD (mIoU against the full masks)",
                    effect_verdict(seg, +1), f"end mIoU ADM {mean_ci(miou['adm'])}, GD "
                    f"{mean_ci(miou['gd'])}; difference {seg}", "ADM - GD > 0 (paired by seed)")]


def report_adm_vs_gd(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    """Per run: mIoU and regularised loss against network steps, GD vs ADM (first seed), and
    ``<run>_verdict.md`` / ``.json`` over the seeds."""
    out_dir = Path(out_dir)
    paths = []
    for run in runs:
        cfg = config_from_run(AdmVsGdConfig, run)
        views = [SeedRun(run, s) for s in cfg.seeds]
        if "gd/miou" not in views[0].metric_names():
            raise ValueError(f"run {run.dir} has no mIoU records; run it first")
        paths.append(_figure(views[0], cfg, out_dir / f"{run.dir.name}_adm_vs_gd.png"))
        end = {k: {m: np.array([v.history(f"{m}/{k}")[1][-1] for v in views])
                   for m in ("gd", "adm")} for k in ("miou", "reg_loss")}
        write_verdicts(out_dir, verdicts(end["miou"], end["reg_loss"]),
                       {"seeds": ",".join(map(str, cfg.seeds)), "images": cfg.n_images,
                        "lambda": cfg.lam, "ADM iterations": cfg.outer},
                       f"{run.dir.name}_verdict")
    return paths


def _figure(run: SeedRun, cfg: AdmVsGdConfig, path: Path) -> Path:
    fig, axes = new_figure(1, 2, size=(4.2, 3.3))
    for method, color in (("gd", "C0"), ("adm", "C3")):
        axes[0, 0].plot(*run.history(f"{method}/miou"), color=color, label=method.upper())
        axes[0, 1].plot(*run.history(f"{method}/reg_loss"), color=color, label=method.upper())
    if "adm/labels_miou" in run.metric_names():
        axes[0, 0].plot(*run.history("adm/labels_miou"), color="C3", ls=":",
                        label="ADM cut labels")
    axes[0, 0].set(xlabel="network steps", ylabel="mIoU vs full masks",
                   title=f"segmentation (seed {run.seed})")
    axes[0, 1].set(xlabel="network steps", ylabel="pCE + lam relaxed Potts (per pixel)",
                   title=f"regularised loss (lam={cfg.lam})")
    for ax in axes[0]:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


register_experiment(
    "adm-vs-gd",
    "ADM with graph cuts vs GD on a scribble-supervised Potts-regularised segmentation loss.",
    AdmVsGdConfig, run_adm_vs_gd, report_adm_vs_gd, demo=AdmVsGdConfig(n_images=6, outer=8))
