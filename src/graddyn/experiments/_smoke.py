"""``smoke``: a seconds-long built-in experiment on synthetic blobs, so the framework (run,
resume, sweep, report, show, demo) is exercised end to end without the real studies.

It uses every resumable piece on purpose: dropout (torch RNG), SGD momentum (optimizer
state), a step learning-rate schedule, label noise with a corrupt mask, an instrument on a
schedule and checkpoints on a schedule. Everything is float64, so resume is bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from graddyn.data import corrupt_labels
from graddyn.experiments._base import EXPERIMENTS, Experiment
from graddyn.experiments._config import check_min
from graddyn.instruments._base import Instrument, Probe
from graddyn.train import (
    Event,
    OnEvent,
    Probes,
    Recording,
    Run,
    Trainer,
    at_end,
    every,
    new_figure,
    save_figure,
)


@dataclass(frozen=True)
class SmokeConfig:
    n_train: int = 96
    n_test: int = 48
    dim: int = 5
    classes: int = 3
    width: int = 16
    steps: int = 40
    batch_size: int = 16
    lr: float = 0.1
    optimizer: Literal["sgd", "adam"] = "sgd"
    noise: float = 0.0  # fraction of training labels shuffled among themselves
    eval_every: int = 10
    checkpoint_every: int = 10
    sleep: float = 0.0  # seconds per step, so a test can kill the run half-way
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {self.noise}")
        check_min(self, "steps eval_every checkpoint_every batch_size")


class GroupLoss(Instrument):
    """Mean probe loss of the pristine and the corrupt examples (no gradients needed)."""

    name: ClassVar[str] = "group_loss"
    needs_grads: ClassVar[bool] = False

    def __init__(self, corrupt: Tensor) -> None:
        self.corrupt = corrupt  # (N,) bool over the training set
        self.reset()

    def update(self, probe: Probe) -> None:
        assert probe.losses is not None and probe.indices is not None
        groups = self.corrupt[probe.indices]  # (B,)
        self.sums += torch.stack([probe.losses[~groups].sum(), probe.losses[groups].sum()])
        self.counts += torch.stack([(~groups).sum(), groups.sum()])

    def compute(self) -> dict[str, Any]:
        means = self.sums / self.counts.clamp(min=1)
        return {"pristine": means[0], "corrupt": means[1]}

    def reset(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64)
        self.counts = torch.zeros(2, dtype=torch.float64)


def make_blobs(cfg: SmokeConfig) -> tuple[SimpleNamespace, torch.Tensor]:
    """Gaussian blobs around random class centres, float64; labels of a ``noise`` fraction of
    the training set shuffled among themselves. Returns (data, corrupt mask (N,))."""
    g = torch.Generator().manual_seed(cfg.seed)
    centres = 2.0 * torch.randn(cfg.classes, cfg.dim, generator=g, dtype=torch.float64)
    n = cfg.n_train + cfg.n_test
    y = torch.randint(cfg.classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, cfg.dim, generator=g, dtype=torch.float64)
    train_y, mask = corrupt_labels(y[: cfg.n_train], cfg.noise, g)
    data = SimpleNamespace(train_x=x[: cfg.n_train], train_y=train_y,
                           test_x=x[cfg.n_train:], test_y=y[cfg.n_train:])
    return data, mask


@EXPERIMENTS.register("smoke")
class Smoke(Experiment):
    """Built-in seconds-long MLP on synthetic blobs that exercises the whole framework."""

    Config = SmokeConfig

    def run(self, config: SmokeConfig, run: Run) -> None:
        data, mask = make_blobs(config)
        f64 = torch.float64  # explicit: the init must not depend on the default dtype
        model = nn.Sequential(
            nn.Linear(config.dim, config.width, dtype=f64), nn.Tanh(), nn.Dropout(0.1),
            nn.Linear(config.width, config.classes, dtype=f64),
        )
        if config.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=config.lr,
                                                         momentum=0.9)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, config.steps // 2))
        interventions = []
        if config.sleep > 0:
            interventions.append(OnEvent(Event.AFTER_STEP, lambda st: time.sleep(config.sleep)))
        trainer = Trainer(
            model, opt, data, batch_size=config.batch_size, seed=config.seed, run=run,
            probes=Probes([(GroupLoss(mask), every(5) | at_end)]),
            interventions=interventions, lr_scheduler=sched,
            recording=Recording(eval=every(config.eval_every) | at_end,
                                checkpoint=every(config.checkpoint_every) | at_end),
        )
        trainer.fit(config.steps)
        with torch.no_grad():
            model.eval()
            pred = model(data.test_x).argmax(1)
        confusion = torch.zeros(config.classes, config.classes, dtype=torch.int64)
        confusion.index_put_((data.test_y, pred), torch.ones(len(pred), dtype=torch.int64),
                           accumulate=True)
        run.log_array("test_confusion", confusion)

    def report(self, runs: list[Run], out_dir: Path) -> list[Path]:
        paths = super().report(runs, out_dir)
        fig, axes = new_figure(1, 1)
        axes[0, 0].imshow(runs[0].load_array("test_confusion"), cmap="Blues")
        axes[0, 0].set_title(f"test confusion ({runs[0].name})", fontsize=8)
        return [*paths, save_figure(fig, Path(out_dir) / "confusion.png")]
