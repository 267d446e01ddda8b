"""The ``Trainer``'s data order: minibatches drawn without replacement, a fresh permutation
per epoch, the last short batch dropped (as ``graddyn.data.iterate_minibatches``), in one
object whose ``state_dict`` makes a resumed run draw the same batches bit for bit.

>>> s = EpochSampler(5, 2, seed=0)
>>> [len(s.next()[0]) for _ in range(2)], s.epoch_done
([2, 2], True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class EpochSampler:
    """Index batches (B,) of ``range(n)``; ``seed`` seeds a generator of its own."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.per_epoch = n // batch_size
        self._gen = torch.Generator().manual_seed(seed)
        self._epoch_state = self._gen.get_state()  # before this epoch's permutation
        self._perm: Tensor | None = None  # (n,) this epoch's order
        self.pos = 0  # batches of the current epoch already taken

    def next(self) -> tuple[Tensor, bool]:
        """The next batch's indices (B,) and whether it starts an epoch (a permutation was
        just drawn)."""
        starts = self.pos == 0
        if starts:
            self._epoch_state = self._gen.get_state()
            self._perm = torch.randperm(self.n, generator=self._gen)
        assert self._perm is not None
        idx = self._perm[self.pos * self.batch_size : (self.pos + 1) * self.batch_size]
        self.pos += 1
        return idx, starts

    @property
    def epoch_done(self) -> bool:
        """The last batch of the epoch was taken; ``end_epoch`` starts the next one."""
        return self.pos == self.per_epoch

    def end_epoch(self) -> None:
        self.pos = 0
        self._epoch_state = self._gen.get_state()

    def state_dict(self) -> dict[str, Any]:
        """``pos``: batches of the epoch taken; ``data_rng``: the generator before the
        epoch's permutation (drawn again on load). Keys as in older checkpoints."""
        return {"pos": self.pos, "data_rng": self._epoch_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._gen.set_state(state["data_rng"])
        self._epoch_state, self.pos = state["data_rng"], state["pos"]
        if self.pos > 0:  # mid-epoch: draw this epoch's permutation again
            self._perm = torch.randperm(self.n, generator=self._gen)
