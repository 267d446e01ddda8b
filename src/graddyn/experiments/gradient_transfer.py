"""Experiment ``gradient-transfer``: cumulative-gradient transfer, fusion and forgetting.

Tests the claims of "Rethinking the dependence between gradients and the initial point in
deep learning" with the baselines its reviewers asked for. With ``g_A = thetaT_A - theta0_A``:

* ``alpha-sweep``: ``theta' = theta0 + alpha * g_A`` onto ``own-init`` (theta0_A),
  ``other-seed`` (same scheme, new seed), ``other-scheme`` (orthogonal init) and ``zero``;
  ``own-init+P(g)`` (theta0_A + alpha * P(g_A), P a random hidden-unit permutation: a weight
  permutation that keeps g_A's function but breaks its match with its init);
  ``perm-labels/*``, ``perm-rows/*`` (label permutation: ``_gradient_transfer_studies.py``);
  baselines ``scaled`` (``alpha * thetaT_A``) and ``scaled+noise`` (``alpha * thetaT_A + eps``,
  ``||eps||`` per tensor equal to ``||theta0_B - alpha * theta0_A||``, i.e. exactly what the
  other-seed transfer adds to ``alpha * thetaT_A``). Train/test accuracy and loss vs alpha.
* ``fusion``: A trained on task A, B on task B; ``theta_B + alpha * theta_A`` with and without
  permutation alignment of A to B (Git Re-Basin weight matching); linear paths
  ``(1-t) theta_B + t theta_A`` (tasks A/B) and between two seeds on the full data (linear
  mode connectivity, Frankle et al. 2020), raw and aligned, with their loss barriers.
* ``forgetting``: A -> B sequentially: fine-tune, EWC (each lambda), transfer
  (``thetaT_A + alpha * g_B``, g_B from an independent run on B), fusion
  (``thetaT_B + alpha * thetaT_A``, raw and aligned); references A-only, B-only, joint.

Tasks: ``split`` (classes 0-4 then 5-9, one shared 10-way head; ``acc`` is the 10-way
accuracy, ``task_acc`` the accuracy with the argmax restricted to the task's classes) or
``permuted`` (full data, then the same with a fixed pixel permutation). Batch-norm statistics
are recomputed on the training inputs after every weight-space edit (a no-op for the MLP).

    graddyn run gradient-transfer --set study=fusion --set dataset=mnist-subset
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graddyn.data import (
    DataSplits,
    iterate_minibatches,
    permute_pixels,
    split_by_classes,
    subsample,
)
from graddyn.experiments._base import register_experiment
from graddyn.experiments._gradient_transfer_report import report_gradient_transfer
from graddyn.experiments._gradient_transfer_studies import label_permutation_control
from graddyn.experiments._seeds import check_seeds, each_seed_once, load_study_data
from graddyn.interventions.alignment import (
    apply_permutation,
    permutation_align,
    permutation_spec,
)
from graddyn.interventions.continual import EWC
from graddyn.interventions.weightspace import (
    barrier,
    cumulative_gradient,
    fuse,
    interpolate,
    model_state,
    recompute_bn_stats,
    scaled_plus_noise,
    state_norm,
    transfer,
    transfer_deviation,
    zeros_like_state,
)
from graddyn.models import build_model, init_weights
from graddyn.train import Run

__all__ = [
    "GradientTransferConfig",
    "make_model",
    "make_tasks",
    "report_gradient_transfer",
    "run_gradient_transfer",
]

STUDIES = ("alpha-sweep", "fusion", "forgetting")
TASKS = ("split", "permuted")
State = dict[str, Tensor]


@dataclass(frozen=True)
class GradientTransferConfig:
    """All knobs of the experiment; defaults run each study in about a minute on 2 cores."""

    study: Literal["alpha-sweep", "fusion", "forgetting"] = "alpha-sweep"
    dataset: str = "digits"
    preprocess: Literal["scale", "standardize"] = "standardize"
    model: Literal["mlp", "cnn"] = "mlp"  # mlp: width x depth; cnn: hidden = width
    width: int = 128
    depth: int = 2
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
    tasks: Literal["split", "permuted"] = "split"
    shared_init: bool = False  # fusion/forgetting: train B from theta0_A instead of a new seed
    ewc_lambdas: tuple[float, ...] = (100.0, 1000.0, 10000.0)
    n_points: int = 11  # points on each linear path
    label_perm: bool = True  # alpha-sweep: also train A' on permuted labels (label_perm control)
    max_train: int = 0  # 0: all training examples
    max_test: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)  # replicates: data subsample, inits, orders

    def __post_init__(self) -> None:
        for name in ("alphas", "ewc_lambdas"):
            object.__setattr__(self, name, tuple(float(a) for a in getattr(self, name)))
        for name, valid in (("study", STUDIES), ("tasks", TASKS), ("model", ("mlp", "cnn"))):
            if getattr(self, name) not in valid:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; valid: {valid}")
        for name in ("width", "depth", "epochs", "batch_size", "n_points"):
            if getattr(self, name) < (2 if name == "n_points" else 1):
                raise ValueError(f"{name} must be positive (n_points >= 2), got {self!r}")
        if not self.alphas:
            raise ValueError("alphas must be a non-empty list, e.g. (0.5, 1.0, 2.0)")
        check_seeds(self.seeds)

    @property
    def seed(self) -> int:
        """The seed of a one-seed view (``replace(cfg, seeds=(s,))``), which the studies
        run on; the first seed otherwise."""
        return self.seeds[0]


# ---- data, models, training ---------------------------------------------------------------
def _subsample(d: DataSplits, cfg: GradientTransferConfig) -> DataSplits:
    """``max_train`` / ``max_test`` random examples (0: all, still shuffled)."""
    n, m = len(d.train_y), len(d.test_y)
    return subsample(d, min(cfg.max_train or n, n), min(cfg.max_test or m, m),
                     torch.Generator().manual_seed(cfg.seed + 12345))


def make_tasks(cfg: GradientTransferConfig) -> tuple[DataSplits, DataSplits, DataSplits]:
    """``(full, task_A, task_B)`` as described in the module docstring."""
    full = _subsample(load_study_data(cfg.dataset, "", cfg.preprocess), cfg)
    if cfg.tasks == "split":
        return full, split_by_classes(full, range(5)), split_by_classes(full, range(5, 10))
    return full, full, permute_pixels(full, torch.Generator().manual_seed(cfg.seed + 777))


def _joint(a: DataSplits, b: DataSplits) -> DataSplits:
    cat = torch.cat
    return DataSplits(
        cat([a.train_x, b.train_x]),
        cat([a.train_y, b.train_y]),
        cat([a.test_x, b.test_x]),
        cat([a.test_y, b.test_y]),
        a.num_classes,
        "joint",
    )


def make_model(
    cfg: GradientTransferConfig, d: DataSplits, seed: int, scheme: str | None = None
) -> nn.Module:
    """float32 model seeded by ``seed``; ``scheme`` re-initialises it (``init_weights``)."""
    torch.manual_seed(seed)
    opts = (
        {"width": cfg.width, "depth": cfg.depth}
        if cfg.model == "mlp"
        else {"hidden": cfg.width, "channels": (16, 32)}
    )
    model = build_model(cfg.model, d.input_shape, d.num_classes, **opts).float()
    return init_weights(model, scheme) if scheme else model


def _train(
    model: nn.Module,
    d: DataSplits,
    cfg: GradientTransferConfig,
    seed: int,
    penalty: Callable[[nn.Module], Tensor] | None = None,
) -> State:
    """Plain minibatch SGD (momentum) on ``d.train``; returns the final state."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(cfg.epochs):
        for idx in iterate_minibatches(len(d.train_y), min(cfg.batch_size, len(d.train_y)), gen):
            loss = F.cross_entropy(model(d.train_x[idx]), d.train_y[idx])
            if penalty is not None:
                loss = loss + penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model_state(model)


@torch.no_grad()
def _scores(
    model: nn.Module, x: Tensor, y: Tensor, classes: Sequence[int] | None = None
) -> tuple[float, float, float]:
    """``(loss, acc, task_acc)``; task_acc restricts the argmax to ``classes``."""
    model.eval()
    out = model(x)
    loss = float(F.cross_entropy(out, y))
    acc = float((out.argmax(1) == y).float().mean())
    if classes is None:
        return loss, acc, acc
    mask = torch.full((out.shape[1],), float("-inf"))
    mask[list(classes)] = 0.0
    return loss, acc, float(((out + mask).argmax(1) == y).float().mean())


def _task_classes(cfg: GradientTransferConfig, task: str) -> list[int] | None:
    if cfg.tasks != "split":
        return None
    return list(range(5)) if task == "A" else list(range(5, 10))


def _measure(
    model: nn.Module,
    state: State,
    tasks: dict[str, DataSplits],
    prefix: str,
    cfg: GradientTransferConfig,
    splits: Sequence[str] = ("train", "test"),
) -> dict[str, float]:
    """Load ``state``, recompute BN stats on all tasks' training inputs, score every split."""
    model.load_state_dict(state)
    recompute_bn_stats(model, torch.cat([d.train_x for d in tasks.values()]))
    out = {}
    for name, d in tasks.items():
        for split in splits:
            loss, acc, task_acc = _scores(
                model, getattr(d, f"{split}_x"), getattr(d, f"{split}_y"), _task_classes(cfg, name)
            )
            key = f"{prefix}/{name}/{split}" if len(tasks) > 1 else f"{prefix}/{split}"
            out |= {f"{key}_loss": loss, f"{key}_acc": acc}
            if cfg.tasks == "split" and name in ("A", "B"):
                out[f"{key}_task_acc"] = task_acc
    return out


# ---- studies ------------------------------------------------------------------------------
def _alpha_sweep(cfg: GradientTransferConfig, run: Run) -> None:
    full, _, _ = make_tasks(cfg)
    model = make_model(cfg, full, cfg.seed)
    theta0_a = model_state(model)
    thetaT_a = _train(model, full, cfg, cfg.seed)
    g_a = cumulative_gradient(theta0_a, thetaT_a)
    inits = {
        "own-init": theta0_a,
        "other-seed": model_state(make_model(cfg, full, cfg.seed + 1)),
        "other-scheme": model_state(make_model(cfg, full, cfg.seed + 2, "orthogonal")),
        "zero": zeros_like_state(theta0_a),
    }
    norms = {"theta0_A": theta0_a, "thetaT_A": thetaT_a, "g_A": g_a}
    run.log(0, {f"norm/{k}": state_norm(v) for k, v in norms.items()})
    # weight permutation: theta0_A + alpha * P(g_A) breaks the match of g_A with its own init
    spec, gen_p = permutation_spec(model), torch.Generator().manual_seed(cfg.seed + 5)
    perms = {g: torch.randperm(n, generator=gen_p) for g, n in spec.groups.items()}
    g_perm = apply_permutation(g_a, spec, perms)
    gen = torch.Generator().manual_seed(cfg.seed + 99)
    data = {"full": full}
    # label permutation: A' trained on pi(y) from theta0_A; theta0 + alpha * g_A' (and P_out(g_A))
    label_perm = [{} for _ in cfg.alphas]
    if cfg.label_perm:
        label_perm = label_permutation_control(model, full, theta0_a, g_a, inits, cfg, _train)
    for i, alpha in enumerate(cfg.alphas):
        metrics = {"alpha": alpha} | label_perm[i]
        for name, theta0 in inits.items():
            metrics |= _measure(model, transfer(theta0, g_a, alpha), data, name, cfg)
        metrics |= _measure(model, transfer(theta0_a, g_perm, alpha), data, "own-init+P(g)", cfg)
        dev = transfer_deviation(inits["other-seed"], theta0_a, alpha)
        norms = {k: float(v.norm()) for k, v in dev.items() if v.is_floating_point()}
        noisy = scaled_plus_noise(thetaT_a, alpha, norms, gen)
        metrics |= _measure(model, scaled_plus_noise(thetaT_a, alpha, 0.0), data, "scaled", cfg)
        metrics |= _measure(model, noisy, data, "scaled+noise", cfg)
        metrics["scaled+noise/noise_norm"] = state_norm(dev)
        run.log(i, metrics)


def _train_pair(
    cfg: GradientTransferConfig, a: DataSplits, b: DataSplits
) -> tuple[nn.Module, State, State, State, State]:
    """Train A from seed and B from seed+1 (or the same init); model, theta0/T of A and B."""
    model = make_model(cfg, a, cfg.seed)
    theta0_a = model_state(model)
    thetaT_a = _train(model, a, cfg, cfg.seed)
    seed_b = cfg.seed if cfg.shared_init else cfg.seed + 1
    model_b = make_model(cfg, b, seed_b)
    theta0_b = model_state(model_b)
    thetaT_b = _train(model_b, b, cfg, seed_b + 1000)
    return model, theta0_a, thetaT_a, theta0_b, thetaT_b


def _aligned(model: nn.Module, target: State, moved: State) -> State:
    """``moved`` with its hidden units permuted to match ``target``."""
    m_t, m_m = copy.deepcopy(model), copy.deepcopy(model)
    m_t.load_state_dict(target)
    m_m.load_state_dict(moved)
    return permutation_align(m_t, m_m).state


def _path(
    cfg: GradientTransferConfig,
    run: Run,
    model: nn.Module,
    start: State,
    end: State,
    tasks: dict[str, DataSplits],
    name: str,
) -> None:
    """Scores along ``(1-t) start + t end`` and the loss barrier on the union of the tasks."""
    for j, t in enumerate(np.linspace(0.0, 1.0, cfg.n_points)):
        run.log(
            j,
            {"t": float(t)} | _measure(model, interpolate(start, end, float(t)), tasks, name, cfg),
        )
    union = tasks["full"] if "full" in tasks else _joint(tasks["A"], tasks["B"])
    for split in ("train", "test"):
        data = (getattr(union, f"{split}_x"), getattr(union, f"{split}_y"))
        res = barrier(model, start, end, data, cfg.n_points, bn_data=union.train_x)
        run.log(
            0,
            {
                f"{name}/{split}_loss_barrier": res.loss_barrier,
                f"{name}/{split}_acc_barrier": res.accuracy_barrier,
            },
        )


def _fusion(cfg: GradientTransferConfig, run: Run) -> None:
    full, a, b = make_tasks(cfg)
    model, _, thetaT_a, _, thetaT_b = _train_pair(cfg, a, b)
    tasks = {"A": a, "B": b}
    variants = {"raw": thetaT_a, "aligned": _aligned(model, thetaT_b, thetaT_a)}
    for i, alpha in enumerate(cfg.alphas):
        metrics = {"alpha": alpha}
        for name, theta_a in variants.items():
            metrics |= _measure(model, fuse(thetaT_b, theta_a, alpha), tasks, f"fuse-{name}", cfg)
        run.log(i, metrics)
    for name, theta_a in variants.items():
        _path(cfg, run, model, thetaT_b, theta_a, tasks, f"interp-{name}")
    # linear mode connectivity on one task: two seeds trained on the full data
    m1, m2 = make_model(cfg, full, cfg.seed + 10), make_model(cfg, full, cfg.seed + 11)
    s1, s2 = _train(m1, full, cfg, cfg.seed + 10), _train(m2, full, cfg, cfg.seed + 11)
    for name, end in {"raw": s2, "aligned": _aligned(m1, s1, s2)}.items():
        _path(cfg, run, m1, s1, end, {"full": full}, f"lmc-{name}")


def _forgetting(cfg: GradientTransferConfig, run: Run) -> None:
    _, a, b = make_tasks(cfg)
    tasks = {"A": a, "B": b}
    model, _, thetaT_a, theta0_b, thetaT_b = _train_pair(cfg, a, b)
    g_b = cumulative_gradient(theta0_b, thetaT_b)
    refs = {"A-only": thetaT_a, "B-only": thetaT_b}
    model.load_state_dict(thetaT_a)
    refs["fine-tune"] = _train(model, b, cfg, cfg.seed + 2000)
    for lam in cfg.ewc_lambdas:
        model.load_state_dict(thetaT_a)
        ewc = EWC.from_task(model, a.train_x, a.train_y, lam)
        refs[f"ewc-{lam:g}"] = _train(model, b, cfg, cfg.seed + 2000, ewc.penalty)
    joint = make_model(cfg, a, cfg.seed)
    refs["joint"] = _train(joint, _joint(a, b), cfg, cfg.seed + 3000)
    metrics: dict[str, float] = {}
    for name, state in refs.items():
        metrics |= _measure(model, state, tasks, name, cfg, ("test",))
    run.log(0, metrics)
    theta_a_aligned = _aligned(model, thetaT_b, thetaT_a)
    for i, alpha in enumerate(cfg.alphas):
        m = {"alpha": alpha}
        m |= _measure(model, transfer(thetaT_a, g_b, alpha), tasks, "transfer", cfg, ("test",))
        m |= _measure(model, fuse(thetaT_b, thetaT_a, alpha), tasks, "fuse-raw", cfg, ("test",))
        m |= _measure(
            model, fuse(thetaT_b, theta_a_aligned, alpha), tasks, "fuse-aligned", cfg, ("test",)
        )
        run.log(i, m)


def run_gradient_transfer(config: GradientTransferConfig, run: Run) -> None:
    """Run the configured study for every seed and log its metrics under ``seed<s>/`` (see
    the module docstring for names); a seed that finished is skipped on resume."""
    study = {"alpha-sweep": _alpha_sweep, "fusion": _fusion, "forgetting": _forgetting}
    each_seed_once(run, config.seeds, lambda seed, view: study[config.study](
        replace(config, seeds=(seed,)), view))


def _report_pngs(runs: list[Run], out_dir: Path) -> list[Path]:
    """PNG figures per run; markdown tables (accuracy in %) are written beside them."""
    return [p for p in report_gradient_transfer(runs, out_dir) if p.suffix == ".png"]


register_experiment(
    "gradient-transfer",
    "Cumulative-gradient transfer, model fusion and forgetting, with reviewers' baselines.",
    GradientTransferConfig, run_gradient_transfer, _report_pngs,
    demo=GradientTransferConfig(study="fusion", epochs=5, width=32, n_points=5))
