"""Experiment ``coherent-gradients.winsorize``: winsorized SGD against label noise, Chatterjee,
"Coherent Gradients: An Approach to Understanding Generalization in Gradient Descent-based
Optimization" (ICLR 2020), Section 3.

The prediction under test: if a parameter only moves in directions that many examples agree
on, examples that agree with nobody (corrupt labels) are not memorised. Winsorized SGD
(``graddyn.interventions.winsorize.WinsorizedGradient``) clips, per coordinate, the ``c``
largest and ``c`` smallest of the B per-example gradients before averaging; ``c = 0`` is
plain SGD. One run = one (noise, c) point, so the paper's grid is a sweep::

    # the default grid (2 x 3 points)
    graddyn sweep coherent-gradients.winsorize --grid c=4,1,0 noise=0,0.5 --workers 2
    # the paper's full grid (5 x 5) at the subset's length
    graddyn sweep coherent-gradients.winsorize --grid c=8,4,2,1,0 noise=0,0.25,0.5,0.75,1 \\
        --workers 2
    # the paper's length: all 60,000 MNIST images, 60,000 steps (local MNIST)
    graddyn sweep coherent-gradients.winsorize --grid c=8,4,2,1,0 noise=0,0.25,0.5,0.75,1 \\
        --set dataset=mnist --workers 2
    # the convolutional demonstration (small CNN on the MNIST subset, short)
    graddyn sweep coherent-gradients.winsorize --grid c=4,1,0 \\
        --set model=cnn noise=0.5 steps=100 --workers 2
    graddyn report <sweep name printed above>

(Larger ``c`` first: those runs are the slow ones, so two workers finish together.)

Setup (the paper's): MLP with 3 hidden layers of 256 ReLUs, plain SGD (lr 0.1, batch 100, no
momentum, no regulariser), inputs as pixels / 255 (``preprocess``), a ``noise`` fraction of the
training labels shuffled among themselves (``graddyn.data.corrupt_labels``), clean test labels.
Every point is trained once per seed of ``seeds`` (metrics prefixed ``seed<s>/``; a seed fixes
the subset, the corruption, the initial weights and the data order, shared by every c, so
points pair by seed). Also on MNIST-1D: ``--set dataset=mnist1d`` (1-D signals, MLP only).
Recorded at every evaluation: ``train/acc`` (against the noisy labels), ``test/acc``, the losses,
``learned_at/frac_learned_pristine`` / ``_corrupt`` (fraction of each group classified as
labelled: memorisation of the corrupt labels) and ``overfit`` =
train_acc - [eps / K + (1 - eps) test_acc] (eps = noise, K classes; the paper's 0.1 = 1/10):
the training accuracy in excess of what a model that generalises as well as it tests would
reach on the noisy labels. The report (``_winsorize_report``) draws the grid and checks the
paper's three predictions.

Cost: a winsorized step (``WinsorizedGradient``) runs the compiled kernel of
``graddyn._kernels.winsorize``: Linear layers never materialise per-example gradients, other
layers are materialised in blocks; 4-10x a plain step on the MLP at c = 1-8
(``docs/benchmarks_winsorize.md``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from graddyn._robust import check_c
from graddyn.experiments._base import EXPERIMENTS, Experiment
from graddyn.experiments._config import check_min
from graddyn.experiments._seeds import check_seeds, load_study_data, noisy_subset
from graddyn.experiments._winsorize_report import draw_report, overfit_measure
from graddyn.instruments import LearnedAt
from graddyn.interventions.winsorize import DEFAULT_BUDGET, WinsorizedGradient
from graddyn.models._init import check_scheme
from graddyn.train import Probes, Recording, Run, Trainer, at_end, every

# The paper's length on full MNIST: 100 epochs of 600 batches of 100.
PAPER_STEPS = 60_000
# Subset default: 500 training images (5 batches an epoch), 300 steps = 60 epochs, enough
# for plain SGD (c = 0) to memorise 50 % noise (~100 % training accuracy); a grid point takes
# seconds. Larger runs: --set n_train=... steps=... (or dataset=mnist for the paper's).
SUBSET_STEPS = 300
SUBSET_TRAIN = 500


@dataclass(frozen=True)
class WinsorizeConfig:
    """One (noise, c) point. ``steps=0`` and ``n_train=0`` pick the dataset's default: on
    ``mnist`` the paper's 60,000 steps on all 60,000 images; elsewhere ``SUBSET_STEPS`` on
    ``SUBSET_TRAIN`` images (a seeded random subset). ``width``/``depth`` size the MLP (the
    paper's 3 x 256) and are ignored by ``model=cnn`` (``graddyn.models`` ``cnn``).
    ``memory_budget_mb`` bounds the extra memory of a winsorized step."""

    dataset: str = "mnist-subset"  # or mnist1d (MLP only), or mnist (local files)
    data_root: str = ""  # "" -> graddyn.data's default folder (real MNIST is read from there)
    preprocess: Literal["scale", "standardize"] = "scale"  # pixels / 255, as the paper's code
    model: Literal["mlp", "cnn"] = "mlp"
    noise: float = 0.0  # fraction eps of training labels shuffled among themselves
    c: int = 0  # values clipped at each end of each coordinate's B per-example gradients
    n_train: int = 0
    width: int = 256
    depth: int = 3
    init: str = "xavier-sqrt2"  # a graddyn.models init scheme; "pytorch": PyTorch's default
    steps: int = 0
    batch_size: int = 100
    lr: float = 0.1
    eval_points: int = 20  # whole train / test set evaluations (+ step 0 and the end)
    checkpoint_points: int = 4
    memory_budget_mb: float = DEFAULT_BUDGET / 2**20
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be a fraction in [0, 1] (e.g. noise=0.5), got "
                             f"{self.noise}")
        check_min(self, "width batch_size eval_points checkpoint_points")
        check_min(self, "n_train steps depth", 0)
        if 0 < self.n_train < self.batch_size:
            raise ValueError(f"n_train={self.n_train} is smaller than batch_size="
                             f"{self.batch_size}; raise n_train or lower batch_size")
        if not self.lr > 0 or not self.memory_budget_mb > 0:
            raise ValueError(f"lr and memory_budget_mb must be > 0, got {self.lr}, "
                             f"{self.memory_budget_mb}")
        check_c(self.c, self.batch_size)  # c < batch_size / 2, named in the message
        check_seeds(self.seeds)
        check_scheme(self.init)

    @property
    def total_steps(self) -> int:
        """``steps`` after resolving 0 to the dataset's default."""
        return self.steps or (PAPER_STEPS if self.dataset == "mnist" else SUBSET_STEPS)

    @property
    def train_size(self) -> int:
        """``n_train`` after resolving 0 (all of ``mnist``; ``SUBSET_TRAIN`` elsewhere)."""
        return self.n_train or (0 if self.dataset == "mnist" else SUBSET_TRAIN)


def build_network(cfg: WinsorizeConfig, splits: Any, seed: int) -> nn.Module:
    """The paper's MLP (``width`` x ``depth`` ReLU) or the small CNN, seeded by ``seed`` so
    every (noise, c) point of a seed starts from the same weights."""
    from graddyn.models import build_model

    torch.manual_seed(seed)
    if cfg.model == "mlp":
        return build_model("mlp", splits.input_shape, splits.num_classes, width=cfg.width,
                           depth=cfg.depth, init=cfg.init)
    if len(splits.input_shape) != 3:
        raise ValueError(f"model=cnn needs images (C, H, W); {cfg.dataset!r} has inputs of shape "
                         f"{splits.input_shape}: use model=mlp")
    return build_model("cnn", splits.input_shape, splits.num_classes, init=cfg.init)


def make_trainer(cfg: WinsorizeConfig, splits: Any, run: Run | None, seed: int
                 ) -> tuple[Trainer, Tensor]:
    """Model, SGD, the winsorized gradient step and the evaluation / checkpoint schedules of
    one seed (metrics and checkpoints under the tag ``seed<s>``), and the corrupt mask (N,)."""
    data, mask = noisy_subset(splits, cfg.train_size, cfg.noise, seed)
    model = build_network(cfg, splits, seed).to(data.train_x.dtype)
    step = WinsorizedGradient(cfg.c, memory_budget_bytes=int(cfg.memory_budget_mb * 2**20))
    steps = cfg.total_steps
    evals = every(max(1, math.ceil(steps / cfg.eval_points))) | at_end
    return Trainer(
        model, torch.optim.SGD(model.parameters(), lr=cfg.lr), data,
        batch_size=cfg.batch_size, seed=seed, gradient=step, run=run, tag=f"seed{seed}",
        # run_long: the record of when each example was learned lives across evaluations
        # (reset at each one, every learned example would date from the current step)
        probes=Probes([(LearnedAt(run_long=True, corrupt=mask), evals)],
                      size=len(data.train_y), batch_size=1000),
        recording=Recording(eval=evals, checkpoint=every(
            max(1, math.ceil(steps / cfg.checkpoint_points))) | at_end),
    ), mask


def log_overfit(run: Run, noise: float, num_classes: int, prefix: str = "") -> None:
    """Log ``<prefix>overfit`` at every step that has both ``<prefix>train/acc`` and
    ``<prefix>test/acc`` (idempotent: a resumed run rewrites the same values)."""
    s_tr, train = run.history(f"{prefix}train/acc")
    s_te, test = run.history(f"{prefix}test/acc")
    steps, i, j = np.intersect1d(s_tr, s_te, return_indices=True)
    values = overfit_measure(train[i], test[j], noise, num_classes)
    for step, v in zip(steps, values):
        run.log(int(step), {f"{prefix}overfit": float(v)})


# ``graddyn demo``-sized: one winsorized point, 3 seeds, 100 steps.
DEMO = WinsorizeConfig(noise=0.5, c=1, steps=100)


@EXPERIMENTS.register("coherent-gradients.winsorize")
class Winsorize(Experiment):
    """Chatterjee (ICLR 2020) winsorized SGD: clipping weak gradient directions vs label noise."""

    Config = WinsorizeConfig

    def run(self, config: WinsorizeConfig, run: Run) -> None:
        splits = load_study_data(config.dataset, config.data_root, config.preprocess)
        start = time.perf_counter()
        for seed in config.seeds:
            trainer, mask = make_trainer(config, splits, run, seed)
            run.log_array(f"seed{seed}/corrupt_mask", mask)
            run.set_meta(total_steps=config.total_steps, num_classes=splits.num_classes,
                         train_size=len(trainer.y))
            trainer.fit(config.total_steps)
            log_overfit(run, config.noise, splits.num_classes, f"seed{seed}/")
        run.set_meta(fit_seconds=round(time.perf_counter() - start, 2))

    def report(self, runs: list[Run], out_dir: Path) -> list[Path]:
        return draw_report(runs, Path(out_dir))

    def demo_config(self) -> WinsorizeConfig:
        """``DEMO``: one winsorized (c = 1, 50 % noise) point, 100 steps, 3 seeds."""
        return DEMO
