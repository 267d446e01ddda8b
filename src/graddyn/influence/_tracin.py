"""TracInCP: exact training-data influence from checkpoints, over all layers, ghost products.

Pruthi, Liu, Kale & Sundararajan, "Estimating Training Data Influence by Tracing Gradient
Descent", NeurIPS 2020. For a training example z and a test example z',

    TracInCP(z, z') = sum_t eta_t <grad l(w_t, z), grad l(w_t, z')>
    self-influence(z) = sum_t eta_t |grad l(w_t, z)|^2

over checkpoints w_t with learning rates eta_t. A positive score marks a *proponent* (a step
on z lowers the loss on z'), a negative one an *opponent*.

Every inner product comes from :meth:`graddyn.pergrad.BatchGrads.cross_gram`: per layer the
engine uses the ghost form (never forming per-example gradients; Linear layers cost
(p + q) per pair instead of p q) or materialises them when that is cheaper (convolutions with
many output pixels). The test side's materialised per-example gradients are built on the
first training batch and reused for all the others (``BatchGrads`` keeps them, up to
``FLAT_CACHE_BYTES`` per test chunk). Memory: the test gradients of every checkpoint (held
factored, plus those materialised layers) plus one training batch. Cost: T (forward +
backward) passes over the training set and the test set, plus the products.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from graddyn._losses import LossFn, per_example_cross_entropy
from graddyn.influence._checkpoints import check_checkpoints
from graddyn.pergrad import BatchGrads, capture


class TopK(NamedTuple):
    """Strongest training examples for each test example; every field is (N_test, k).

    proponents: indices of the k largest scores, largest first.
    opponents: indices of the k smallest (most negative) scores, smallest first.
    """

    proponents: Tensor
    proponent_scores: Tensor
    opponents: Tensor
    opponent_scores: Tensor


def _check_data(x: Tensor, y: Tensor, what: str) -> int:
    if len(x) != len(y):
        raise ValueError(f"{what}: inputs and targets differ in length ({len(x)} vs {len(y)}); "
                         "pass one target per input")
    if len(x) == 0:
        raise ValueError(f"{what}: no examples; pass at least one (x, y) pair")
    return len(x)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


class TracIn:
    """TracInCP over ``checkpoints`` = ``[(state_dict, lr), ...]`` of ``model``.

    params: None (all trainable parameters) or a restriction to some layers: names of
        parameters or modules, modules or parameters, as for :func:`graddyn.capture`
        (e.g. ``[last_linear(model)[0]]`` for last-layer TracIn).
    loss_fn: (outputs (B, ...), targets (B,)) -> per-example losses (B,).
    strategy: the engine's 'auto' (cost model), 'ghost' or 'materialize'.

    Gradients are taken in eval mode (no dropout, batch norm on running statistics). The
    model's own weights and mode are restored after each call.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> ckpts = [(model.state_dict(), 0.1)]
    >>> x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    >>> tracin = TracIn(model, ckpts)
    >>> tracin.scores(x, y, x[:2], y[:2]).shape, tracin.self_influence(x, y).shape
    (torch.Size([10, 2]), torch.Size([10]))
    """

    def __init__(self, model: nn.Module, checkpoints: Sequence[Any],
                 loss_fn: LossFn = per_example_cross_entropy, params: object = None,
                 strategy: str = "auto") -> None:
        self.model = model
        self.checkpoints = check_checkpoints(checkpoints, model)
        self.loss_fn, self.params, self.strategy = loss_fn, params, strategy

    # --- public -----------------------------------------------------------------------------
    def scores(self, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
               batch_size: int = 256) -> Tensor:
        """TracInCP(z_i, z'_j) for every training i and test j -> (N_train, N_test).

        Training examples stream ``batch_size`` at a time (all checkpoints per batch)."""
        n = _check_data(train_x, train_y, "training data")
        rows = [block for _, block in self._blocks(train_x, train_y, test_x, test_y,
                                                   batch_size)]
        out = torch.cat(rows)
        assert out.shape[0] == n
        return out

    def top_k(self, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
              k: int = 10, batch_size: int = 256) -> TopK:
        """The k strongest proponents and opponents of each test example, streamed.

        Memory: (N_test, 2 k) plus one (batch_size, N_test) block; the full score matrix is
        never held."""
        n = _check_data(train_x, train_y, "training data")
        if not 1 <= k <= n:
            raise ValueError(f"k must be between 1 and the number of training examples {n}, "
                             f"got {k}")
        best = worst = None  # (scores (N_test, k), indices (N_test, k))
        for sl, block in self._blocks(train_x, train_y, test_x, test_y, batch_size):
            idx = torch.arange(sl.start, sl.stop, device=block.device).expand(block.shape[1], -1)
            best = _merge(best, block.T, idx, k, largest=True)
            worst = _merge(worst, block.T, idx, k, largest=False)
        assert best is not None and worst is not None
        return TopK(best[1], best[0], worst[1], worst[0])

    def self_influence(self, train_x: Tensor, train_y: Tensor, batch_size: int = 256,
                       per_checkpoint: bool = False) -> Tensor:
        """sum_t eta_t |grad l(w_t, z_i)|^2 for every training example -> (N,).

        ``per_checkpoint=True``: the terms eta_t |grad l(w_t, z_i)|^2 -> (T, N), so that
        subsets of checkpoints are sums of rows. Uses only per-example squared norms
        (``BatchGrads.norms``): ghost cost (p + q) per example for a Linear layer, one pass
        per checkpoint, no cross products."""
        sq = self._sq_norms(train_x, train_y, batch_size)  # (T, N)
        lrs = torch.tensor([lr for _, lr in self.checkpoints], dtype=sq.dtype, device=sq.device)
        terms = lrs[:, None] * sq
        return terms if per_checkpoint else terms.sum(0)

    # --- internals ----------------------------------------------------------------------------
    def _blocks(self, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                batch_size: int) -> Iterator[tuple[slice, Tensor]]:
        """(rows, scores (B, N_test)) for consecutive training batches, summed over t."""
        n = _check_data(train_x, train_y, "training data")
        m = _check_data(test_x, test_y, "test data")
        _check_batch_size(batch_size)
        with self._restored():
            tests = []  # per checkpoint: the test set's BatchGrads, in chunks of batch_size
            for state, _ in self.checkpoints:
                self._load(state)
                tests.append([self._grads(test_x[s:s + batch_size], test_y[s:s + batch_size])
                              for s in range(0, m, batch_size)])
            for s in range(0, n, batch_size):
                sl = slice(s, min(s + batch_size, n))
                block = None
                for (state, lr), test in zip(self.checkpoints, tests):
                    self._load(state)
                    g = self._grads(train_x[sl], train_y[sl])
                    c = lr * torch.cat([g.cross_gram(h) for h in test], dim=1)  # (B, N_test)
                    block = c if block is None else block + c
                assert block is not None
                yield sl, block

    def _sq_norms(self, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
        """|grad l(w_t, z_n)|^2 for every checkpoint t -> (T, N)."""
        n = _check_data(x, y, "training data")
        _check_batch_size(batch_size)
        out = []
        with self._restored():
            for state, _ in self.checkpoints:
                self._load(state)
                out.append(torch.cat([self._grads(x[s:s + batch_size], y[s:s + batch_size]
                                                  ).norms() ** 2
                                      for s in range(0, n, batch_size)]))
        return torch.stack(out)

    def _grads(self, x: Tensor, y: Tensor) -> BatchGrads:
        """Per-example gradients of loss_fn on (x, y) at the current weights."""
        with capture(self.model, params=self.params, strategy=self.strategy) as cap:
            losses = self.loss_fn(self.model(x), y)
            if losses.shape != (len(x),):
                raise ValueError(f"loss_fn must return per-example losses of shape ({len(x)},),"
                                 f" got {tuple(losses.shape)}; use reduction='none'")
        return cap.backward(losses)

    def _load(self, state: Mapping[str, Tensor]) -> None:
        self.model.load_state_dict(state)

    @contextmanager
    def _restored(self) -> Iterator[None]:
        """Eval mode inside; the model's own weights and mode are restored afterwards."""
        own = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        training = self.model.training
        try:
            self.model.eval()
            yield
        finally:
            self.model.load_state_dict(own)
            self.model.train(training)


def _merge(current: tuple[Tensor, Tensor] | None, scores: Tensor, idx: Tensor, k: int,
           largest: bool) -> tuple[Tensor, Tensor]:
    """Keep the k largest (or smallest) of current and new (scores, indices) per row."""
    if current is not None:
        scores = torch.cat([current[0], scores], dim=1)
        idx = torch.cat([current[1], idx], dim=1)
    top, pos = scores.topk(min(k, scores.shape[1]), dim=1, largest=largest, sorted=True)
    return top, idx.gather(1, pos)
