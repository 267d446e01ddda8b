"""Experiment ``coherent-gradients.median-of-3``: SGD vs the median-of-3 optimizers under label
noise, Zielinski, Krishnan & Chatterjee, "Weak and Strong Gradient Directions: Explaining
Memorization, Generalization, and Hardness of Examples at Scale" (2020).

Their prediction: suppressing weak gradient directions, those that only one minibatch
supports, suppresses memorisation of corrupt labels. The coordinate-wise median of 3
minibatch gradients does that (``M3``: 3 minibatches at one point, one update per 3; ``RM3``:
the rolling median of the current and the two previous minibatch gradients, every step);
the *average* of 3 (``RA3``, rolling; ``A3``, M3's matched control) does not, since a mean
keeps a direction that one minibatch supports strongly. Momentum would mix past gradients
back in, so every optimizer here is momentum-free, as in the paper
(``graddyn.interventions.median_optim``).

Setup: a ``noise`` fraction of training labels shuffled among themselves
(``graddyn.data.corrupt_labels``), clean test labels; the winsorized-SGD network (3 x 256 ReLU
MLP, the per-example version of the same idea), lr 0.1, batch 100, pixels / 255. Every
optimizer sees the same minibatches (a "step" is one minibatch, so M3 and A3 make a third as
many updates, as in the paper where M3 splits a minibatch of 3B into 3 groups), from the same
initial weights, per seed. Recorded per (seed, optimizer) at every evaluation: ``train/acc``
(noisy labels), ``test/acc``, ``learned_at/frac_learned_corrupt`` (corrupt examples fit to
their wrong label: memorisation) and ``_pristine``. The report checks the prediction over
seeds with the rules of ``_stats``.

Departures from the paper (config values): MNIST subset (or MNIST-1D) and an MLP instead of
ImageNet and ResNet/Inception/VGG; ``n_train`` training images for ``steps`` minibatches.

    graddyn run coherent-gradients.median-of-3                        # ~2-5 min on 2 cores
    graddyn run coherent-gradients.median-of-3 --set dataset=mnist1d
    graddyn report coherent-gradients.median-of-3
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from graddyn.experiments._base import EXPERIMENTS, Experiment
from graddyn.experiments._config import check_min, set_names
from graddyn.experiments._seeds import check_seeds, load_study_data, noisy_subset
from graddyn.experiments._stats import (
    absence_verdict,
    all_of,
    effect_verdict,
    mean_ci,
    paired_diff,
)
from graddyn.experiments._verdicts import (
    Verdict,
    departures,
    end_value,
    mean_over_steps,
    not_tested,
    write_verdicts,
)
from graddyn.instruments import LearnedAt
from graddyn.interventions.median_optim import A3, M3, RA3, RM3
from graddyn.models._init import check_scheme
from graddyn.train import Probes, Recording, Run, Trainer, at_end, every, new_figure, save_figure

OPTIMIZERS: dict[str, Any] = {"sgd": torch.optim.SGD, "m3": M3, "a3": A3, "rm3": RM3,
                              "ra3": RA3}
MEDIANS = {"m3": "a3", "rm3": "ra3"}  # median -> its average-of-3 control

# Parameters of the verdicts (written into the verdict file).
SAME_MARGIN = 0.05  # (3) |corrupt fit RA3 - SGD| below this: "does not suppress"
TEST_MARGIN = 0.02  # (1, 2) the median may cost at most this much test accuracy
WINDOW = 3  # "end" of a curve: median of its last evaluations


@dataclass(frozen=True)
class MedianOf3Config:
    """Defaults: 1,000 training images of the MNIST subset at 50 % noise, 1,500 minibatches
    (150 epochs), seeds 0, 1, 2; every optimizer in ``optimizers``."""

    dataset: str = "mnist-subset"  # or mnist1d, or mnist (local files)
    data_root: str = ""
    preprocess: Literal["scale", "standardize"] = "scale"  # pixels / 255
    optimizers: tuple[str, ...] = ("sgd", "m3", "a3", "rm3", "ra3")
    noise: float = 0.5
    n_train: int = 1000  # 0: the whole training split
    width: int = 256
    depth: int = 3
    init: str = "xavier-sqrt2"  # "pytorch": PyTorch's default
    steps: int = 1500  # minibatches per optimizer and seed
    batch_size: int = 100
    lr: float = 0.1
    eval_points: int = 20
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        set_names(self, "optimizers", OPTIMIZERS)
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be a fraction in [0, 1], got {self.noise}")
        check_min(self, "width depth steps batch_size eval_points")
        if self.n_train < 0 or not self.lr > 0:
            raise ValueError(f"n_train must be >= 0 and lr > 0, got {self.n_train}, {self.lr}")
        check_seeds(self.seeds)
        check_scheme(self.init)


def make_trainer(cfg: MedianOf3Config, splits: Any, optimizer: str, seed: int,
                 run: Run | None) -> Trainer:
    """One (optimizer, seed): the seed's subset, corruption, initial weights and data order
    (shared by every optimizer), metrics under ``seed<s>/<optimizer>/``."""
    from graddyn.models import build_model

    data, mask = noisy_subset(splits, cfg.n_train, cfg.noise, seed)
    torch.manual_seed(seed)
    model: nn.Module = build_model("mlp", splits.input_shape, splits.num_classes,
                                   width=cfg.width, depth=cfg.depth, init=cfg.init
                                   ).to(data.train_x.dtype)
    opt = OPTIMIZERS[optimizer](model.parameters(), lr=cfg.lr)
    evals = every(max(1, math.ceil(cfg.steps / cfg.eval_points))) | at_end
    return Trainer(model, opt, data, batch_size=cfg.batch_size, seed=seed, run=run,
                   tag=f"seed{seed}/{optimizer}",
                   probes=Probes([(LearnedAt(corrupt=mask), evals)], size=len(mask),
                                 batch_size=1000),
                   recording=Recording(eval=evals, checkpoint=at_end))


# ---- verdicts ---------------------------------------------------------------------------
Curve = tuple[np.ndarray, np.ndarray]
Histories = Mapping[int, Mapping[str, Mapping[str, Curve]]]  # seed -> optimizer -> name


def _end(hist: Histories, opt: str, name: str) -> np.ndarray:
    """(S,) end values (median of the last evaluations) of ``name`` for ``opt``."""
    return np.array([end_value(h[opt].get(name), WINDOW) if opt in h else np.nan
                     for h in hist.values()], float)


def _memorised(hist: Histories, opt: str) -> np.ndarray:
    """(S,) memorisation of ``opt``: the fraction of corrupt labels fitted, averaged over
    training (step-weighted), so that a method that memorises later counts as memorising
    less even when every method has memorised everything by the end."""
    return np.array([mean_over_steps(h[opt]["corrupt_fit"]) if opt in h
                     and "corrupt_fit" in h[opt] else np.nan for h in hist.values()], float)


def _fewer(hist: Histories, a: str, b: str) -> tuple[str, str]:
    """``a`` memorises less than ``b`` (paired by seed)."""
    est = paired_diff(_memorised(hist, a), _memorised(hist, b))
    return effect_verdict(est, -1), f"memorisation {a} - {b} {est}"


def _not_worse(hist: Histories, a: str, b: str) -> tuple[str, str]:
    """``a``'s test accuracy is not below ``b``'s by ``TEST_MARGIN`` or more."""
    est = paired_diff(_end(hist, a, "test_acc"), _end(hist, b, "test_acc"))
    shifted = mean_ci(_end(hist, a, "test_acc") - _end(hist, b, "test_acc") + TEST_MARGIN)
    return effect_verdict(shifted, +1), f"test acc {a} - {b} {est}"


def verdicts(hist: Histories, noise: float) -> list[Verdict]:
    """The paper's prediction checked over seeds (rules: ``_stats``)."""
    opts = set.intersection(*(set(h) for h in hist.values())) if hist else set()
    rows = []
    for med in ("m3", "rm3"):
        name = f"({1 if med == 'm3' else 2}) {med.upper()} suppresses memorisation of corrupt " \
               "labels without costing test accuracy"
        if noise == 0 or not {med, "sgd"} <= opts:
            rows.append(not_tested(name, f"needs noise > 0 and both {med} and sgd"))
            continue
        parts = [_fewer(hist, med, "sgd"), _not_worse(hist, med, "sgd")]
        rows.append(Verdict(name, all_of(w for w, _ in parts), "; ".join(e for _, e in parts),
                            f"memorisation {med} - sgd < 0 and end test acc {med} - sgd > "
                            f"-{TEST_MARGIN} (paired by seed)"))
    name = "(3) the average of 3 (RA3) memorises as SGD does"
    if noise == 0 or not {"ra3", "sgd"} <= opts:
        rows.append(not_tested(name, "needs noise > 0 and both ra3 and sgd"))
    else:
        est = paired_diff(_memorised(hist, "ra3"), _memorised(hist, "sgd"))
        rows.append(Verdict(name, absence_verdict(est, SAME_MARGIN),
                            f"memorisation ra3 - sgd {est}",
                            f"|memorisation ra3 - sgd| < {SAME_MARGIN} (absence, paired)"))
    name = "(4) the median, not the averaging, suppresses it (median vs its average control)"
    pairs = [(m, a) for m, a in MEDIANS.items() if {m, a} <= opts]
    if noise == 0 or not pairs:
        rows.append(not_tested(name, "needs noise > 0 and rm3 with ra3 (or m3 with a3)"))
    else:
        parts = [_fewer(hist, m, a) for m, a in pairs]
        rows.append(Verdict(name, all_of(w for w, _ in parts), "; ".join(e for _, e in parts),
                            "memorisation median - its average-of-3 control < 0 (paired)"))
    return rows


def summary_markdown(hist: Histories, optimizers: tuple[str, ...]) -> str:
    """Per optimizer: memorisation (corrupt labels fitted, mean over training), then end
    train / test accuracy and corrupt / pristine fit; mean ± 95 % interval over seeds."""
    cols = (("train acc", "train_acc"), ("test acc", "test_acc"),
            ("corrupt labels fitted", "corrupt_fit"), ("pristine fitted", "pristine_fit"))
    lines = ["| optimizer | memorisation (mean over training) | "
             + " | ".join(f"end {c}" for c, _ in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for opt in optimizers:
        cells = [str(mean_ci(_memorised(hist, opt)))]
        cells += [str(mean_ci(_end(hist, opt, key))) for _, key in cols]
        lines.append(f"| {opt} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- collecting and drawing ---------------------------------------------------------------
NAMES = {"train_acc": "train/acc", "test_acc": "test/acc",
         "corrupt_fit": "learned_at/frac_learned_corrupt",
         "pristine_fit": "learned_at/frac_learned_pristine"}


def collect(run: Run) -> dict[int, dict[str, dict[str, Curve]]]:
    """seed -> optimizer -> curves of one run (pairs that have not evaluated are left out)."""
    present = set(run.metric_names())
    out: dict[int, dict[str, dict[str, Curve]]] = {}
    for seed in run.config["seeds"]:
        for opt in run.config["optimizers"]:
            tag = f"seed{seed}/{opt}/"
            if f"{tag}train/acc" in present:
                out.setdefault(int(seed), {})[opt] = {
                    k: run.history(tag + v) for k, v in NAMES.items() if tag + v in present}
    return out


def draw_report(runs: list[Run], out_dir: Path) -> list[Path]:
    """Per run: curves (mean over seeds), ``verdict.md`` / ``.json`` and ``summary.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for run in runs:
        hist = collect(run)
        if not hist:
            raise ValueError(f"run {run.name!r} has no median-of-3 evaluations; run it first "
                             "(graddyn run coherent-gradients.median-of-3)")
        cfg = run.config
        params = {"seeds": ",".join(map(str, hist)), "noise": cfg["noise"],
                  "dataset": cfg["dataset"], "minibatches": cfg["steps"],
                  "training images": cfg["n_train"],
                  "differs from the study's default config": departures(cfg, MedianOf3Config()),
                  "memorisation": "fraction of corrupt labels fitted, step-weighted mean over "
                                  "training",
                  "end of a curve": f"median of the last {WINDOW} evaluations",
                  "test-accuracy margin": TEST_MARGIN, "same-memorisation margin": SAME_MARGIN}
        prefix = "" if len(runs) == 1 else f"{run.name}_"
        write_verdicts(out_dir, verdicts(hist, cfg["noise"]), params, f"{prefix}verdict")
        (out_dir / f"{prefix}summary.md").write_text(
            summary_markdown(hist, tuple(cfg["optimizers"])))
        paths.append(_curves(hist, tuple(cfg["optimizers"]),
                             out_dir / f"{prefix}median-of-3.png"))
    return paths


def _curves(hist: Histories, optimizers: tuple[str, ...], path: Path) -> Path:
    fig, axes = new_figure(1, 3, size=(4.0, 3.2))
    titles = (("train_acc", "training accuracy (noisy labels)"), ("test_acc", "test accuracy"),
              ("corrupt_fit", "corrupt labels fitted (memorisation)"))
    for ax, (key, title) in zip(axes[0], titles):
        for i, opt in enumerate(optimizers):
            curves = [h[opt][key] for h in hist.values() if opt in h and key in h[opt]]
            if curves:
                ax.plot(curves[0][0], np.mean([c[1] for c in curves], axis=0), label=opt,
                        color=f"C{i}", ls="--" if opt in ("a3", "ra3") else "-")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("minibatches")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"SGD vs median / average of 3 (mean over {len(hist)} seeds)", fontsize=9)
    return save_figure(fig, path)


@EXPERIMENTS.register("coherent-gradients.median-of-3")
class MedianOf3(Experiment):
    """Zielinski et al. (2020): median of 3 minibatch gradients (M3, RM3) vs SGD and RA3."""

    Config = MedianOf3Config

    def run(self, config: MedianOf3Config, run: Run) -> None:
        splits = load_study_data(config.dataset, config.data_root, config.preprocess)
        for seed in config.seeds:
            for opt in config.optimizers:
                make_trainer(config, splits, opt, seed, run).fit(config.steps)

    def report(self, runs: list[Run], out_dir: Path) -> list[Path]:
        return draw_report(runs, Path(out_dir))

    def demo_config(self) -> MedianOf3Config:
        return MedianOf3Config(n_train=500, steps=300)
