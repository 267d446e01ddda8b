"""Experiment ``lsgd``: Leader SGD vs multi-leader LSGD, EASGD and data-parallel SGD.

Teng et al., "Leader Stochastic Gradient Descent for Distributed Training of Deep Learning
Models" (NeurIPS 2019); EASGD: Zhang, Choromanska & LeCun (NeurIPS 2015). The algorithms live
in :mod:`graddyn.distributed`; this module trains the same model on the same data with the
same per-worker step budget and batch size for each worker count and algorithm, and records
test error vs steps and vs training wall-clock, and megabytes sent per worker.

Two ways to run it:

* **Comparison** (plain ``graddyn run lsgd``): for each ``workers`` count ``n`` the parent
  process starts ``n`` local gloo workers per algorithm (``graddyn.distributed.launch``);
  ``n = 1`` runs only data-parallel (= plain SGD). Rank 0 gathers per-worker metrics and
  writes each evaluation as ``<algorithm>/w<n>/<metric>`` when it is made (checkpoints, with
  ``checkpoint_every``, under ``checkpoints/<algorithm>/w<n>/``). Resuming skips finished
  (algorithm, n) pairs and continues the interrupted one from its checkpoint (or redoes it
  without one). Default (digits, 64-unit MLP, 300 steps) takes about a minute on 2 cores.
* **One algorithm under torchrun**:
  ``torchrun --nproc-per-node 4 -m graddyn run lsgd --set algorithm=lsgd``. Every rank runs
  the CLI; the experiment joins the torchrun group (env://), trains ``algorithm`` with
  ``WORLD_SIZE`` workers, and only rank 0 writes the run store (metrics gathered to it,
  checkpoints every ``checkpoint_every`` steps, resumed from ``run.latest_checkpoint()``);
  the other ranks read the run's saved config from it, so a resume needs only
  ``--name NAME --resume`` (every rank must see the same ``--root``).

Reported ``test_error`` is the leader's (LSGD, multi-leader), the center's (EASGD) or the
common model's (data-parallel). The paper's CIFAR-10 setting (CNN7, 4 and 16 workers; test
error about 17 % for LSGD and EASGD vs 20 % for SGD) is :data:`CIFAR10_CNN7`; its
hyper-parameters are our reading of the paper and need CIFAR-10 in the local data folder::

    graddyn run lsgd --set dataset=cifar10 --set model=cnn7 --set workers=4,16 \\
        --set steps=20000 --set batch_size=128 --set lr=0.05 --set momentum=0.9 \\
        --set period=64 --set pull=0.1 --set global_period=256 --set group_size=4 \\
        --set elastic=0.05 --set eval_every=1000
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from graddyn.distributed import (
    ALGORITHMS,
    DistContext,
    build_algorithm,
    in_torchrun,
    init_from_env,
    launch,
    shutdown,
    train_worker,
)
from graddyn.distributed._algorithms import check_fraction, check_period
from graddyn.experiments._base import EXPERIMENTS, Experiment
from graddyn.experiments._seeds import SeedRun, check_seeds, load_study_data
from graddyn.experiments._stats import effect_verdict, mean_ci, paired_diff
from graddyn.experiments._verdicts import Verdict, end_value, write_verdicts
from graddyn.train import Run, new_figure, save_figure


@dataclass(frozen=True)
class LSGDConfig:
    """Defaults: digits, MLP(64), 300 steps of batch 32 per worker, tau = 4, lambda = 0.1."""

    algorithm: str = "lsgd"  # torchrun mode: the algorithm every rank runs
    algorithms: tuple[str, ...] = ("data-parallel", "lsgd", "multi-lsgd", "easgd")
    workers: tuple[int, ...] = (1, 2, 4)  # comparison mode: worker counts
    dataset: str = "digits"
    data_root: str = ""  # "" -> graddyn.data's default folder
    preprocess: Literal["scale", "standardize"] = "standardize"
    model: str = "mlp"  # any graddyn.models name, or "cnn7"
    width: int = 64  # hidden width of mlp / linear-mlp
    steps: int = 300  # per worker
    batch_size: int = 32  # per worker
    lr: float = 0.05
    momentum: float = 0.0
    pull: float = 0.1  # lambda: LSGD pull / multi-leader local pull
    period: int = 4  # tau: communication period (LSGD, local leader, EASGD)
    global_pull: float = 0.1  # lambda_G
    global_period: int = 16  # tau_G
    group_size: int = 2  # multi-leader group size
    elastic: float = 0.1  # EASGD alpha
    window: int = 10  # steps averaged to pick the leader
    eval_every: int = 20
    checkpoint_every: int = 0  # torchrun mode; 0 = never
    timeout_s: float = 60.0  # a dead or hung worker is reported after this
    backend: str = "auto"
    seeds: tuple[int, ...] = (0, 1, 2)  # comparison mode: replicates; torchrun: the first

    @property
    def seed(self) -> int:
        """The seed of a one-seed view (``replace(cfg, seeds=(s,))``); the first otherwise."""
        return self.seeds[0]

    def __post_init__(self) -> None:
        for name in (self.algorithm, *self.algorithms):
            ALGORITHMS.get(name)  # unknown name -> error listing the valid ones
        if not self.workers or any(n < 1 for n in self.workers):
            raise ValueError(f"workers must be positive worker counts, e.g. 1,2,4; "
                             f"got {self.workers!r}")
        for name in ("pull", "global_pull", "elastic"):
            check_fraction(name, getattr(self, name))
        for name in ("period", "global_period", "group_size", "window", "steps",
                     "batch_size", "eval_every"):
            check_period(name, getattr(self, name))
        if self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be >= 0 (0 disables checkpoints)")
        check_seeds(self.seeds)


# Our reading of Teng et al. (2019), CIFAR-10 / CNN7 with 4 and 16 workers.
CIFAR10_CNN7 = LSGDConfig(
    dataset="cifar10", model="cnn7", workers=(4, 16), steps=20000, batch_size=128, lr=0.05,
    momentum=0.9, period=64, pull=0.1, global_period=256, group_size=4, elastic=0.05,
    eval_every=1000, timeout_s=300.0,
)


def cnn7(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """7-layer CNN of the EASGD/LSGD CIFAR experiments: conv5x5-64, pool, conv5x5-128, pool,
    conv3x3-64, fc-256, fc-256, fc-classes (ReLU). (3, 32, 32) -> (num_classes,)."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(128, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(64 * (h // 4) * (w // 4), 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, num_classes),
    )


def _setup(cfg: LSGDConfig, ctx: DistContext) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from graddyn.models import build_model

    splits = load_study_data(cfg.dataset, cfg.data_root, cfg.preprocess)
    torch.manual_seed(cfg.seed)  # same init everywhere (rank 0's is broadcast anyway)
    if cfg.model == "cnn7":
        model = cnn7(tuple(splits.input_shape), splits.num_classes)
    else:
        kw = {"width": cfg.width} if cfg.model in ("mlp", "linear-mlp") else {}
        model = build_model(cfg.model, splits.input_shape, splits.num_classes, **kw)
    data = (splits.train_x, splits.train_y, splits.test_x, splits.test_y)
    return model.to(ctx.device), tuple(t.to(ctx.device) for t in data)


def _train(ctx: DistContext, cfg: LSGDConfig, algorithm: str, run: Run | None = None,
           prefix: str = "", tag: str = "") -> list[tuple[int, dict[str, float]]] | None:
    """Train ``algorithm`` on this worker; rank 0 logs each evaluation to ``run`` (if given)
    as ``<prefix>/<metric>`` and checkpoints under ``tag``, resuming from the newest one."""
    torch.set_num_threads(1)  # workers share the cores
    model, data = _setup(cfg, ctx)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    algo = build_algorithm(algorithm, opt, **asdict(cfg))
    logging = run is not None and ctx.rank == 0
    resume = run.latest_checkpoint(tag) if logging else None
    if resume is not None:
        run.truncate_after(resume[0], prefix=f"{prefix}/")  # re-created from the checkpoint
    return train_worker(
        model, algo, data, steps=cfg.steps, batch_size=cfg.batch_size,
        eval_every=cfg.eval_every, seed=cfg.seed,
        on_eval=(lambda s, m: run.log(s, {f"{prefix}/{k}": v for k, v in m.items()}))
        if logging else None,
        on_checkpoint=(lambda s, st: run.save_checkpoint(s, st, tag=tag)) if logging else None,
        checkpoint_every=cfg.checkpoint_every, resume=None if resume is None else resume[1],
    )


def worker_main(ctx: DistContext, cfg: LSGDConfig, algorithm: str, run_dir: str | None = None,
                prefix: str = "") -> Any:
    """Entry point of one :func:`launch`-ed worker (comparison mode). Rank 0 writes each
    evaluation into the run at ``run_dir`` as it is made (checkpoints under the pair's
    ``prefix``), so a comparison killed half-way keeps what it measured; the parent holds
    the run lock meanwhile."""
    run = Run(Path(run_dir)) if run_dir is not None and ctx.rank == 0 else None
    try:
        return _train(ctx, cfg, algorithm, run, prefix, tag=prefix)
    finally:
        if run is not None:
            run.close()


def plan(cfg: LSGDConfig) -> list[tuple[str, int]]:
    """(algorithm, workers) pairs of the comparison; multi-leader needs >= 2 groups."""
    pairs = []
    for n in cfg.workers:
        for algo in (("data-parallel",) if n == 1 else cfg.algorithms):
            if algo == "multi-lsgd" and (n % cfg.group_size or n // cfg.group_size < 2):
                continue
            pairs.append((algo, n))
    return pairs


@EXPERIMENTS.register("lsgd")
class LeaderSGD(Experiment):
    """Leader SGD vs multi-leader LSGD, EASGD and data-parallel SGD on real processes."""

    Config = LSGDConfig

    def run(self, config: LSGDConfig, run: Run) -> None:
        if in_torchrun():
            ctx = init_from_env(config.backend, config.timeout_s)
            try:  # every rank gets ``run``; only rank 0 writes (the others' is read-only)
                _train(ctx, config, config.algorithm, run,
                       f"{config.algorithm}/w{ctx.world_size}")
            finally:
                shutdown()
            return
        for seed in config.seeds:
            one = replace(config, seeds=(seed,))
            for algo, n in plan(config):
                prefix = f"seed{seed}/{algo}/w{n}"
                steps, _ = run.history(f"{prefix}/test_error")
                if len(steps) and steps[-1] == config.steps:
                    continue  # resumed run: this pair finished already (its last evaluation)
                if not run.checkpoints(prefix):  # a killed attempt without a checkpoint: redo
                    run.truncate_after(-1, prefix=f"{prefix}/")
                launch(worker_main, n, args=(one, algo, str(run.dir), prefix),
                       backend=config.backend, timeout_s=config.timeout_s, preload=(__name__,))

    def report(self, runs: list[Run], out_dir: Path) -> list[Path]:
        """Per run: the comparison figure (first seed; a torchrun run has no seed prefix) and,
        for a comparison run, ``lsgd-<run>_verdict.md`` / ``.json`` over its seeds."""
        paths = []
        for run in runs:
            seeded = [s for s in run.config.get("seeds", ())
                      if SeedRun(run, s).metric_names()]
            view = SeedRun(run, seeded[0]) if seeded else run
            paths.append(draw_comparison(view, Path(out_dir) / f"lsgd-{run.name}.png"))
            if seeded:
                write_verdicts(Path(out_dir), verdicts([SeedRun(run, s) for s in seeded]), {
                    "seeds": ",".join(map(str, seeded)), "dataset": run.config["dataset"],
                    "steps per worker": run.config["steps"],
                    "end": f"median of the last {WINDOW} evaluations"},
                    f"lsgd-{run.name}_verdict")
        return paths

    def demo_config(self) -> LSGDConfig:
        return LSGDConfig(workers=(1, 2), steps=60, eval_every=20)


WINDOW = 3


def verdicts(views: list[Any]) -> list[Verdict]:
    """Teng et al.'s claims, per worker count n > 1, from one ``SeedRun`` per seed: LSGD's
    end test error below data-parallel SGD's and EASGD's (paired by seed), and LSGD sends
    less than data-parallel SGD."""
    series = [_series(v) for v in views]
    counts = sorted({n for s in series for (a, n) in s if a == "lsgd" and n > 1})
    rows = []
    for other in ("data-parallel", "easgd"):
        for n in counts:
            if not all(("lsgd", n) in s and (other, n) in s for s in series):
                continue
            end = {a: np.array([end_value((s[(a, n)]["step"], s[(a, n)]["test_error"]),
                                          WINDOW) for s in series]) for a in ("lsgd", other)}
            est = paired_diff(end["lsgd"], end[other])
            rows.append(Verdict(f"LSGD reaches a lower test error than {other}, {n} workers",
                                effect_verdict(est, -1), f"end test error lsgd "
                                f"{mean_ci(end['lsgd'])}, {other} {mean_ci(end[other])}; "
                                f"difference {est}", "lsgd - other < 0 (paired by seed)"))
    for n in counts:
        if all(("data-parallel", n) in s for s in series):
            mb = {a: np.array([s[(a, n)]["comm_mb"][-1] for s in series])
                  for a in ("lsgd", "data-parallel")}
            est = paired_diff(mb["lsgd"], mb["data-parallel"])
            rows.append(Verdict(f"LSGD sends less than data-parallel SGD, {n} workers",
                                effect_verdict(est, -1), f"MB sent per worker, lsgd - "
                                f"data-parallel: {est}", "difference < 0 (paired by seed)"))
    return rows


_COLORS = {"data-parallel": "tab:gray", "lsgd": "tab:red", "multi-lsgd": "tab:purple",
           "easgd": "tab:blue"}
_STYLES = {1: ":", 2: "--", 4: "-"}


def _series(run: Any) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    out: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for name in run.metric_names():
        algo, w, metric = name.split("/", 2)
        steps, values = run.history(name)
        out.setdefault((algo, int(w[1:])), {"step": steps})[metric] = values
    return out


def draw_comparison(run: Any, path: Path) -> Path:
    """Test error vs steps, vs wall-clock, and MB sent per worker, one line per pair."""
    fig, axes = new_figure(1, 3, size=(4.6, 3.4))
    ax_step, ax_wall, ax_comm = axes[0]
    series = _series(run)
    labels, volumes, colors = [], [], []
    for (algo, n), s in sorted(series.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        label = "SGD, 1 worker" if n == 1 else f"{algo}, {n} workers"
        style = dict(color=_COLORS.get(algo, "k"), ls=_STYLES.get(n, "-."), label=label)
        ax_step.plot(s["step"], 100 * s["test_error"], **style)
        ax_wall.plot(s["wall_s"], 100 * s["test_error"], **style)
        labels.append(label)
        volumes.append(float(s["comm_mb"][-1]))
        colors.append(_COLORS.get(algo, "k"))
    ax_step.set(xlabel="steps per worker", ylabel="test error (%)", title="vs steps")
    ax_wall.set(xlabel="training wall-clock (s)", ylabel="test error (%)", title="vs wall-clock")
    ax_comm.barh(labels, volumes, color=colors)
    ax_comm.set(xlabel="MB sent per worker", title="communication")
    ax_step.legend(fontsize=7)
    return save_figure(fig, path)
