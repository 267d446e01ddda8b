"""The training loop: one small explicit ``Trainer``; see ``Event`` for the annotated loop.

Typical use inside an experiment's ``run(config, run)``::

    seed_all(cfg.seed)
    model = build_model("mlp", splits.input_shape, splits.num_classes)
    trainer = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), splits, batch_size=100,
        seed=cfg.seed, run=run, groups=corrupt_mask,
        instruments=[(Coherence(), every(10)), (Stiffness(), logspaced(20, cfg.steps))],
        eval_schedule=every(100) | at_end, checkpoint_schedule=every(500) | at_end,
    )
    trainer.fit(cfg.steps)        # resumes from the run's latest checkpoint if there is one
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from graddyn.instruments._base import Instrument, Probe
from graddyn.models._utils import evaluate
from graddyn.pergrad import Capture, capture
from graddyn.pergrad._distributed import gather_rows, unwrap
from graddyn.train._events import Batch, Event, Intervention, State
from graddyn.train._measured import measured_backward
from graddyn.train._probes import (
    Engine,
    ProbeRunner,
    load_state_dict_into,
    measure,
    pergrad_engine,
    state_dict_of,
)
from graddyn.train._rng import get_rng_state, set_rng_state
from graddyn.train._rules import GradientRule, LossFn, MeanLoss, per_example_cross_entropy
from graddyn.train._schedules import at_end, every, fires
from graddyn.train._store import Run

Schedule = Callable[[int], bool]
_PROGRESS = [os.environ.get("GRADDYN_QUIET", "") in ("", "0")]
_EVERY_STEP = every(1)


def set_progress(enabled: bool) -> None:
    """Turn progress bars on or off for every ``Trainer`` that does not say (tests, workers)."""
    _PROGRESS[0] = enabled


def progress_enabled() -> bool:
    """Whether trainers show a progress bar by default (env ``GRADDYN_QUIET=1`` turns it off)."""
    return _PROGRESS[0]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step."""


class Trainer:
    """Train ``model`` on ``data`` (anything with ``train_x (N, ...)``, ``train_y (N,)`` and
    optionally ``test_x``, ``test_y``, e.g. ``graddyn.data.DataSplits``) with minibatches drawn
    without replacement, a fresh permutation per epoch, the last short batch dropped (as
    ``graddyn.data.iterate_minibatches``). ``batch_size=None`` is full-batch training.

    seed:        seeds the data order and the probe subset (seed the model yourself, with
                 ``seed_all``, before building it).
    rule:        fills ``p.grad`` for a batch (default ``MeanLoss``); see ``GradientRule``.
    instruments: ``(instrument, schedule)`` pairs, measured on the probe set of ``probe_size``
                 fixed training examples (all if fewer), ``probe_batch_size`` per engine pass.
    batch_instruments: ``(instrument, schedule)`` pairs measured on each *training* minibatch
                 from the step's own backward (``measured_backward``: no second pass, the
                 cheap way to measure every step), at the weights before the update and logged
                 at the step after it (as ``train/batch_loss``). Needs the default rule.
    engine:      per-example gradients for probes; default ``graddyn.capture``.
    tag:         prefix of metric names and subfolder of checkpoints, so several trainers can
                 share one run (e.g. one per noise level).

    Data parallel: pass the model wrapped in ``DistributedDataParallel`` (every rank runs the
    same Trainer under ``torchrun``). ``batch_size`` is then the global batch: every rank draws
    the same one and trains on its contiguous share (rank order), so the run follows
    single-process training on the global batch. ``batch_instruments`` see the global batch
    (``capture(process_group=...)`` gathers each layer's factors; ``p.grad`` is their global
    mean, the same on every rank, so DDP's all-reduce is not needed on those steps and never
    fires: the engine computes ``p.grad`` without ``.backward()``); other steps are plain DDP
    steps. A ``run`` opened read-only (ranks other than 0) is read to resume, never written.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: Any,
        *,
        batch_size: int | None = 100,
        seed: int = 0,
        loss_fn: LossFn = per_example_cross_entropy,
        rule: GradientRule | None = None,
        interventions: Sequence[Intervention] = (),
        instruments: Sequence[tuple[Instrument, Schedule]] = (),
        batch_instruments: Sequence[tuple[Instrument, Schedule]] = (),
        probe_size: int = 256,
        probe_batch_size: int | None = None,
        engine: Engine = pergrad_engine,
        groups: Tensor | None = None,
        run: Run | None = None,
        tag: str = "",
        log_schedule: Schedule | None = _EVERY_STEP,
        eval_schedule: Schedule | None = None,
        eval_batch_size: int = 1000,
        checkpoint_schedule: Schedule | None = at_end,
        lr_scheduler: Any = None,
        progress: bool | None = None,
    ) -> None:
        self.model, self.optimizer, self.data = model, optimizer, data
        self.x, self.y = data.train_x, data.train_y
        n = len(self.y)
        self.batch_size = n if batch_size is None else batch_size
        if not 1 <= self.batch_size <= n:
            raise ValueError(
                f"batch_size={batch_size} must be between 1 and the training set size {n}"
            )
        if groups is not None and groups.shape != (n,):
            raise ValueError(f"groups must have shape ({n},), got {tuple(groups.shape)}")
        self._group = model.process_group if isinstance(model, DDP) else None
        world = 1 if self._group is None else dist.get_world_size(self._group)
        if self._group is not None and (self.batch_size % world or not isinstance(
                rule or MeanLoss(), MeanLoss)):
            raise ValueError(
                f"under DistributedDataParallel batch_size is the global batch, split among "
                f"the {world} ranks, and the gradient is DDP's mean: batch_size={batch_size} "
                f"must be a multiple of {world}, and rule must be the default MeanLoss")
        if batch_instruments and rule is not None and not isinstance(rule, MeanLoss):
            raise ValueError(
                "batch_instruments reuse the plain mean-gradient backward, so they cannot be "
                f"combined with rule={type(rule).__name__}; measure them on the probe set "
                "(instruments=...) instead")
        self.loss_fn, self.rule = loss_fn, rule or MeanLoss()
        self.interventions = list(interventions)
        self.groups, self.run, self.lr_scheduler = groups, run, lr_scheduler
        self.prefix = f"{tag}/" if tag else ""
        self.tag = tag
        self.log_schedule, self.eval_schedule = log_schedule, eval_schedule
        self.eval_batch_size = eval_batch_size
        self.checkpoint_schedule = checkpoint_schedule
        self.progress = progress
        probe_gen = torch.Generator().manual_seed(seed + 7919)  # independent of data order
        probe_idx = torch.randperm(n, generator=probe_gen)[: min(probe_size, n)].sort().values
        self.probes = ProbeRunner(instruments, probe_idx, probe_batch_size, engine)
        self.batch_probes = ProbeRunner(batch_instruments, probe_idx[:0], None, engine)
        clash = ({i.name for i, _ in self.probes.instruments}
                 & {i.name for i, _ in self.batch_probes.instruments})
        if clash:
            raise ValueError(f"instruments {sorted(clash)} are both probe and batch "
                             "instruments; their metrics would share names: keep one")
        # (scalars, arrays) of the batch instruments, between the step and its record
        self._batch_results: tuple[dict[str, float], dict[str, Any]] | None = None
        self._gen = torch.Generator().manual_seed(seed)
        self._epoch_gen_state = self._gen.get_state()  # state before this epoch's permutation
        self._perm: Tensor | None = None
        self._pos = 0  # batches of the current epoch already taken
        self.state: State | None = None
        self._cap: Capture | None = None  # open during fit() when batch instruments exist
        # (step, name, value) records when there is no run to log to
        self.history: list[tuple[int, str, float]] = []

    # ---- the loop -------------------------------------------------------------------------
    def fit(self, max_steps: int) -> State:
        """Train until ``max_steps`` optimizer steps (in total, not more). The first call
        continues from the run's latest checkpoint (under ``tag``) if there is one, dropping
        metrics logged after it; a later call continues from where the previous one stopped."""
        if self.state is not None:  # a second fit() continues where the first stopped
            st, resumed = self.state, True
            st.max_steps = max_steps
        else:
            st = State(self.model, self.optimizer, max_steps, run=self.run)
            self.state = st
            resumed = self._resume(st)
        self._fire(Event.FIT_START, st)
        if not resumed:
            self._record(st, last=max_steps == 0)
        show = _PROGRESS[0] if self.progress is None else self.progress
        with tqdm(total=max_steps, initial=st.step, disable=not show, leave=False,
                  desc=self.tag or "train", dynamic_ncols=True) as bar, self._capture():
            while st.step < max_steps:
                self._train_step(st)
                self._record(st, last=st.step == max_steps)
                bar.update(1)
        self._fire(Event.FIT_END, st)
        return st

    @contextmanager
    def _capture(self) -> Iterator[None]:
        """One capture of the model for the whole fit, rearmed on each measured step: its
        hooks are installed once (a fresh capture per step cost ~0.14 ms a step on the paper's
        MLP). It records nothing between steps; it re-hooks if the parameters change."""
        if not self.batch_probes.instruments:
            yield
            return
        with capture(self.model, process_group=self._group) as cap:
            self._cap = cap
            try:
                yield
            finally:
                self._cap = None

    def _train_step(self, st: State) -> None:
        n_batches = len(self.y) // self.batch_size
        if self._pos == 0:
            self._epoch_gen_state = self._gen.get_state()
            self._perm = torch.randperm(len(self.y), generator=self._gen)
            self._fire(Event.EPOCH_START, st)
        assert self._perm is not None
        idx = self._perm[self._pos * self.batch_size : (self._pos + 1) * self.batch_size]
        self._pos += 1
        mine = idx if self._group is None else idx.tensor_split(
            dist.get_world_size(self._group))[dist.get_rank(self._group)]  # this rank's share
        st.batch = Batch(self.x[mine], self.y[mine], mine)
        self._fire(Event.BATCH_START, st)
        due = self.batch_probes.due(st.step + 1, st.step + 1 == st.max_steps)
        if due:  # measured on this batch, at these weights: the step's own backward
            losses, grads, outputs = measured_backward(self.model, self.loss_fn, st.batch.x,
                                                       st.batch.y, write=False, cap=self._cap)
            losses, outputs, targets, rows = (self._gather(t) for t in (  # the global batch
                losses, outputs, st.batch.y, st.batch.indices))
            self._check_finite(st, losses)
            # measured before p.grad is written: the Gram's factors are still in cache
            # (~0.2 ms a step on the paper's MLP); the values do not depend on the order
            self._batch_results = measure(due, [Probe(
                grads=grads, losses=losses, outputs=outputs, targets=targets, indices=rows,
                groups=None if self.groups is None else self.groups[rows], step=st.step,
                model=self.model)])
            # over last step's p.grad buffers in place (no fresh pages to fault in)
            grads.write_grad(scale=1.0 / len(rows), overwrite=True)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            losses = self._gather(self.rule(self.model, self.loss_fn, st.batch))  # (B,)
            self._check_finite(st, losses)
        st.losses = losses
        self._fire(Event.AFTER_BACKWARD, st)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        st.step += 1
        self._fire(Event.AFTER_STEP, st)
        if self._pos == n_batches:
            self._pos = -1  # marks "epoch ends after this step's measurements"

    def _gather(self, t: Tensor) -> Tensor:
        """Under DDP every rank's rows of ``t``, in rank order: the global batch's."""
        return t if self._group is None else gather_rows(t, self._group)

    def _check_finite(self, st: State, losses: Tensor) -> None:
        if not bool(torch.isfinite(losses).all()):
            raise NonFiniteLossError(
                f"training loss is not finite at step {st.step + 1} (mean {losses.mean():.4g}); "
                f"everything up to step {st.step} is recorded"
                + (f" in {self.run.dir}" if self.run else "")
                + "; lower the learning rate, or check the data and the loss function"
            )

    def _record(self, st: State, last: bool) -> None:
        """Measurements at ``st.step``, BATCH_END / EPOCH_END, then the checkpoint."""
        metrics: dict[str, float] = {}
        if st.losses is not None and fires(self.log_schedule, st.step, last):
            metrics["train/batch_loss"] = float(st.losses.mean())
        if fires(self.eval_schedule, st.step, last):
            metrics.update(self.evaluate())
        scalars, arrays = self.probes.run(
            st.step, last, self.model, self.loss_fn, self.x, self.y, self.groups
        )
        metrics.update(scalars)
        if self._batch_results is not None:
            batch_scalars, batch_arrays = self._batch_results
            self._batch_results = None
            metrics.update(batch_scalars)
            arrays = {**arrays, **batch_arrays}
        self._log(st.step, metrics, arrays)
        if st.batch is not None:
            self._fire(Event.BATCH_END, st)
        if self._pos == -1:
            self._fire(Event.EPOCH_END, st)
            st.epoch += 1
            self._pos = 0
            self._epoch_gen_state = self._gen.get_state()
        if (self.run is not None and not self.run.readonly
                and fires(self.checkpoint_schedule, st.step, last)):
            self.run.save_checkpoint(st.step, self.checkpoint_state(st), tag=self.tag)

    def _log(self, step: int, metrics: dict[str, float], arrays: dict[str, Any]) -> None:
        if self.run is None or self.run.readonly:
            self.history.extend((step, self.prefix + k, v) for k, v in metrics.items())
            return
        if metrics:
            self.run.log(step, {self.prefix + k: v for k, v in metrics.items()})
        for name, value in arrays.items():
            self.run.log_array(self.prefix + name, value, step=step)

    def _fire(self, event: Event, st: State) -> None:
        for iv in self.interventions:
            if iv.match(event, st):
                iv.apply(event, st)

    # ---- evaluation -----------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Mean loss (and accuracy, for class logits) on the training and test sets, in eval
        mode, ``eval_batch_size`` examples at a time. Keys ``train/loss``, ``train/acc``, ..."""
        out: dict[str, float] = {}
        for split in ("train", "test"):
            x = getattr(self.data, f"{split}_x", None)
            y = getattr(self.data, f"{split}_y", None)
            if x is not None and y is not None and len(y) > 0:
                loss, acc = evaluate(self.model, x, y, self.eval_batch_size,
                                     lambda out, t: self.loss_fn(out, t).sum())
                out[f"{split}/loss"] = loss
                if acc is not None:
                    out[f"{split}/acc"] = acc
        return out

    # ---- checkpoints ----------------------------------------------------------------------
    def checkpoint_state(self, st: State) -> dict[str, Any]:
        """Everything needed to continue bit for bit, as tensors and plain containers.
        ``lr`` / ``lrs``: the learning rate(s) in effect for the next step (TracIn's eta_t)."""
        groups = self.optimizer.param_groups
        return {
            "step": st.step, "epoch": st.epoch, "pos": self._pos,
            "model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
            "lr": float(groups[0]["lr"]), "lrs": [float(g["lr"]) for g in groups],
            "rng": get_rng_state(), "data_rng": self._epoch_gen_state,
            "lr_scheduler": state_dict_of(self.lr_scheduler),
            "rule": state_dict_of(self.rule),
            "interventions": [state_dict_of(iv) for iv in self.interventions],
            "instruments": self.probes.state_dicts(),
            "batch_instruments": self.batch_probes.state_dicts(),
        }

    def load_checkpoint_state(self, st: State, ck: dict[str, Any]) -> None:
        """Inverse of ``checkpoint_state``."""
        unwrap(self.model).load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        load_state_dict_into(self.lr_scheduler, ck["lr_scheduler"])
        load_state_dict_into(self.rule, ck["rule"])
        for iv, sd in zip(self.interventions, ck["interventions"]):
            load_state_dict_into(iv, sd)
        self.probes.load_state_dicts(ck["instruments"])
        self.batch_probes.load_state_dicts(ck.get("batch_instruments", []))
        set_rng_state(ck["rng"])
        self._gen.set_state(ck["data_rng"])
        self._epoch_gen_state = ck["data_rng"]
        st.step, st.epoch, self._pos = ck["step"], ck["epoch"], ck["pos"]
        if self._pos > 0:  # mid-epoch: draw this epoch's permutation again
            self._perm = torch.randperm(len(self.y), generator=self._gen)

    def _resume(self, st: State) -> bool:
        if self.run is None:
            return False
        latest = self.run.latest_checkpoint(self.tag)
        if latest is None:
            return False
        step, ck = latest
        if step > st.max_steps:
            raise ValueError(
                f"run {self.run.name!r} has a checkpoint at step {step}, past max_steps="
                f"{st.max_steps}; start a new run (--name) or raise the number of steps"
            )
        self.load_checkpoint_state(st, ck)
        if not self.run.readonly:
            self.run.truncate_after(step, prefix=self.prefix)
        if step > 0:
            self._recreate_grad_buffers()
        return True

    def _recreate_grad_buffers(self) -> None:
        """After step 1 an uninterrupted run always has ``p.grad`` buffers (each step's
        backward leaves them), and the engine writes the next mean gradient *into* them
        (one fused ``addmm``), which rounds differently from the fresh product it returns
        when there is no buffer. A resumed run recreates them so that its next measured
        step takes the same path: bit for bit. Their values are never read: every step
        overwrites or clears ``p.grad`` first."""
        for p in self.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
