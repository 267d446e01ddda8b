"""Experiment ``coherent-gradients.label-noise``: the label-noise study of Chatterjee,
"Coherent Gradients: An Approach to Understanding Generalization in Gradient Descent-based
Optimization" (ICLR 2020), Section 4.

Setup (the paper's): MLP 784 -> 2048 ReLU -> 10-way softmax, plain SGD (lr 0.1, batch 100,
no momentum, no regulariser), inputs as pixels / 255 (``preprocess="scale"``, as the paper's
code; ``"standardize"`` uses the training mean and std instead, which trains several times
faster), a fraction of training labels shuffled among themselves
(``graddyn.data.corrupt_labels``) at each noise level; test labels clean. One run trains every
level for every seed in turn (metrics prefixed ``seed<s>/noise<pct>/``), so ``graddyn demo``
is one command; the report's verdicts are over the seeds (``_stats``).

Recorded per (seed, level):

* ``fit/train_acc``, ``fit/train_loss`` (``probe_size`` training examples, noisy labels),
  ``fit/test_acc``, ``fit/test_loss``, and ``train/batch_loss`` every step;
* ``learned_at/frac_learned_pristine`` / ``_corrupt``: fraction of each group classified
  as labelled (and learned-at steps), on the same training examples;
* ``group_split/f_p``, ``f_c`` (cumulative over the first ``split_steps`` steps, on each
  training minibatch), ``mean_p`` / ``mean_c`` (cumulative per-example means of the loss
  reduction) and ``null{0,1,2}/*`` (group labels permuted: the paper's significance check);
* ``batch_coherence/alpha``, ``m_coherence`` of the training minibatch over training.

The per-minibatch instruments (``Probes(batch_instruments=...)``) reuse the training step's
own backward (``graddyn.train.measured_backward``: one captured backward gives ``p.grad`` and
the Gram), so they cost little.

Run it::

    graddyn demo                                             # DEMO: short, 3 seeds
    graddyn run coherent-gradients.label-noise                       # 100 epochs, 3 seeds
    graddyn run coherent-gradients.label-noise --set dataset=mnist1d # MNIST-1D
    graddyn run coherent-gradients.label-noise --set dataset=mnist   # paper's length, local MNIST
    torchrun --nproc-per-node 2 -m graddyn run coherent-gradients.label-noise --set ddp=true

With ``ddp=true`` (under ``torchrun``) each rank trains on its share of every minibatch in
``DistributedDataParallel`` and the per-minibatch instruments measure the whole minibatch
(``graddyn.capture(process_group=...)``): the same numbers as one process, up to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from graddyn.experiments._base import EXPERIMENTS, Experiment
from graddyn.experiments._config import check_min
from graddyn.experiments._label_noise_report import draw_report
from graddyn.experiments._seeds import check_seeds, load_study_data, noisy_subset
from graddyn.instruments import BatchCoherence, GroupSplit, Instrument, LearnedAt, Probe
from graddyn.models import evaluate
from graddyn.models._init import check_scheme
from graddyn.train import Probes, Recording, Run, Trainer, at, at_end, every, logspaced

# The paper's length on full MNIST (our reading of its figures: 100 epochs of 600 batches).
PAPER_STEPS = 60_000
# The same 100 epochs on the embedded 4,000-example sets (mnist-subset, mnist1d).
SUBSET_STEPS = 4_000


@dataclass(frozen=True)
class LabelNoiseConfig:
    """Defaults: the paper's model, optimiser, preprocessing and length in epochs (100) on the
    embedded ``mnist-subset`` (4,000 training / 1,000 test images): ``SUBSET_STEPS`` = 4,000
    steps per level, seeds 0, 1, 2. ``steps=0`` picks ``PAPER_STEPS`` on ``mnist`` and
    ``SUBSET_STEPS`` elsewhere. Budget departures, all config values: the 4,000-image
    subset instead of 60,000 images; accuracy and learned-at evaluated on ``probe_size``
    training examples (and the test set) only ``eval_points`` times per level, and f_p / f_c
    only for the first ``split_steps`` (forward passes dominate otherwise). ``graddyn demo``
    runs the shorter ``DEMO``. ``init="pytorch"`` keeps PyTorch's default initialisation."""

    dataset: str = "mnist-subset"  # or mnist1d, or mnist (local files)
    data_root: str = ""  # "" -> graddyn.data's default folder (real MNIST is read from there)
    preprocess: Literal["scale", "standardize"] = "scale"  # pixels / 255 (the paper's code)
    noise_levels: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    n_train: int = 0  # 0: the whole training split; else a random subset of this size
    width: int = 2048
    init: str = "xavier-sqrt2"  # a graddyn.models init scheme; "pytorch": PyTorch's default
    steps: int = 0  # per noise level; 0: PAPER_STEPS on mnist, SUBSET_STEPS otherwise
    batch_size: int = 100
    lr: float = 0.1
    eval_points: int = 15  # evaluations of the train probe / test set per level (+ step 0)
    probe_size: int = 1000  # training examples evaluated for accuracy / learned-at; 0: all
    split_steps: int = 100  # f_p / f_c measured on every minibatch of the first steps
    null_worlds: int = 3
    coherence_points: int = 30  # log-spaced minibatch coherence measurements per level
    seeds: tuple[int, ...] = (0, 1, 2)  # subset, corruption, init and order of each replicate
    ddp: bool = False  # under torchrun: DistributedDataParallel, batch_size split among ranks

    def __post_init__(self) -> None:
        if not self.noise_levels or any(not 0.0 <= f <= 1.0 for f in self.noise_levels):
            raise ValueError(f"noise_levels must be fractions in [0, 1], e.g. 0,0.5,1; got "
                             f"{self.noise_levels!r}")
        check_min(self, "width batch_size eval_points coherence_points")
        check_min(self, "n_train steps split_steps null_worlds probe_size", 0)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        check_seeds(self.seeds)
        check_scheme(self.init)

    @property
    def total_steps(self) -> int:
        """Steps per noise level after resolving ``steps=0``."""
        if self.steps:
            return self.steps
        return PAPER_STEPS if self.dataset == "mnist" else SUBSET_STEPS


def level_tag(fraction: float, seed: int | None = None) -> str:
    """Metric prefix of a noise level (of one seed): 0.25 -> ``noise25``, ``seed1/noise25``."""
    tag = f"noise{round(100 * fraction)}"
    return tag if seed is None else f"seed{seed}/{tag}"


class Fit(Instrument):
    """Loss and accuracy of the probe examples (against their, possibly noisy, labels) and of
    a held-out set evaluated with the probe's model at ``compute``. Keys: train_loss,
    train_acc, test_loss, test_acc. Forward passes only: the training set's forward is the
    probe runner's, shared with the run-long ``LearnedAt``."""

    name: ClassVar[str] = "fit"
    needs_grads: ClassVar[bool] = False

    def __init__(self, test_x: Tensor | None = None, test_y: Tensor | None = None,
                 batch_size: int = 1000) -> None:
        self.test_x, self.test_y, self.batch_size = test_x, test_y, batch_size
        self.reset()

    def reset(self) -> None:
        self._loss, self._correct, self._n = 0.0, 0, 0
        self._model: torch.nn.Module | None = None

    def update(self, probe: Probe) -> None:
        if probe.losses is None or probe.outputs is None or probe.targets is None:
            raise ValueError("Fit needs Probe(losses=..., outputs=logits, targets=y)")
        self._loss += float(probe.losses.sum())
        self._correct += int((probe.outputs.argmax(-1) == probe.targets).sum())
        self._n += len(probe.targets)
        self._model = probe.model

    def compute(self) -> dict[str, Any]:
        if self._n == 0:
            raise RuntimeError("Fit.compute() called before any update(); call update first")
        out = {"train_loss": self._loss / self._n, "train_acc": self._correct / self._n}
        if self._model is not None and self.test_x is not None and self.test_y is not None:
            out["test_loss"], out["test_acc"] = evaluate(self._model, self.test_x, self.test_y,
                                                         self.batch_size)
        return out


def _schedules(cfg: LabelNoiseConfig) -> dict[str, Any]:
    """When each measurement fires (steps count optimizer updates; 0 = initial weights)."""
    steps = cfg.total_steps
    eval_every = max(1, math.ceil(steps / cfg.eval_points))
    ckpt_every = max(1, math.ceil(steps / 4))
    return {
        "eval": every(eval_every) | at_end,
        "checkpoint": (lambda s: s > 0 and s % ckpt_every == 0) | at_end,
        "split": (lambda s: 1 <= s <= cfg.split_steps),
        "coherence": logspaced(cfg.coherence_points, steps, include_zero=False) | at([steps]),
    }


# ``graddyn demo``: 3 seeds, but 2,000 of the subset's training images and 400 steps
# (20 epochs) per level instead of 4,000 images x 4,000 steps, f_p / f_c over the first 50
# steps, 10 evaluations per level: a few minutes on 2 cores.
DEMO = LabelNoiseConfig(n_train=2000, steps=400, split_steps=50, eval_points=10)


@EXPERIMENTS.register("coherent-gradients.label-noise")
class LabelNoise(Experiment):
    """Chatterjee (ICLR 2020) label noise: learning speed, pristine vs corrupt, f_p / f_c."""

    Config = LabelNoiseConfig

    def run(self, config: LabelNoiseConfig, run: Run) -> None:
        splits = load_study_data(config.dataset, config.data_root, config.preprocess)
        if not run.readonly:  # under torchrun only rank 0 writes
            run.set_meta(total_steps=config.total_steps)
        try:
            for seed in config.seeds:
                for fraction in config.noise_levels:
                    self.train_level(config, run, splits, fraction, seed)
        finally:
            if config.ddp:
                from graddyn.distributed import shutdown

                shutdown()

    def train_level(self, cfg: LabelNoiseConfig, run: Run | None, splits: Any,
                    fraction: float, seed: int) -> Trainer:
        """Train one noise level of one seed (resuming its checkpoint if the run has one)."""
        from graddyn.models import build_model

        tag = level_tag(fraction, seed)
        data, mask = noisy_subset(splits, cfg.n_train, fraction, seed)
        writes = run is not None and not run.readonly
        if writes:
            run.log_array(f"{tag}/corrupt_mask", mask)
            run.log_array(f"{tag}/train_labels", data.train_y)
        torch.manual_seed(seed)  # the same initial weights at every noise level
        model = build_model("mlp", splits.input_shape, splits.num_classes, width=cfg.width,
                            depth=1, init=cfg.init).to(data.train_x.dtype)
        if cfg.ddp:
            from graddyn.distributed import data_parallel

            model, data = data_parallel(model, data)
        sched = _schedules(cfg)

        trainer = Trainer(
            model, torch.optim.SGD(model.parameters(), lr=cfg.lr), data,
            batch_size=cfg.batch_size, seed=seed, run=run, tag=tag,
            probes=Probes(
                [(Fit(data.test_x, data.test_y), sched["eval"]),
                 (LearnedAt(run_long=True, corrupt=mask), sched["eval"])],
                batch_instruments=[
                    (GroupSplit(mask, cfg.null_worlds, seed, cumulative=True), sched["split"]),
                    (BatchCoherence(), sched["coherence"])],
                size=cfg.probe_size or len(data.train_y), batch_size=1000),
            recording=Recording(checkpoint=sched["checkpoint"]))
        trainer.fit(cfg.total_steps)
        if writes:  # a finished level needs only its last checkpoint (6 MB each)
            for _, path in run.checkpoints(tag)[:-1]:
                path.unlink()
        return trainer

    def report(self, runs: list[Run], out_dir: Path) -> list[Path]:
        return draw_report(runs, Path(out_dir))

    def demo_config(self) -> LabelNoiseConfig:
        """``DEMO``: 3 seeds on half the subset for a tenth of the steps, to fit
        ``make demo``."""
        return DEMO
