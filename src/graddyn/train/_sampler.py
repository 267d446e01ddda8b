"""The ``Trainer``'s data order: batches without replacement, a fresh permutation per epoch,
the last short batch dropped (as ``graddyn.data.iterate_minibatches``); its ``state_dict``
makes a resumed run draw the same batches.

>>> s = EpochSampler(5, 2, seed=0)
>>> [len(s.next()[0]) for _ in range(2)], s.epoch_done
([2, 2], True)
"""

from __future__ import annotations

from typing import Any

import torch


class EpochSampler:
    """Index batches (B,) of ``range(n)`` from a generator of its own, seeded by ``seed``."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.per_epoch = n, batch_size, n // batch_size
        self._gen = torch.Generator().manual_seed(seed)
        self._epoch_state = self._gen.get_state()  # before this epoch's permutation
        self._perm = torch.empty(0, dtype=torch.long)  # (n,) this epoch's order
        self.pos = 0  # batches of the epoch taken

    def next(self) -> tuple[torch.Tensor, bool]:
        """The next batch's indices (B,) and whether it starts an epoch."""
        starts = self.pos == 0
        if starts:  # the generator is at _epoch_state here (init, end_epoch, load)
            self._perm = torch.randperm(self.n, generator=self._gen)
        i = self.pos * self.batch_size
        self.pos += 1
        return self._perm[i : i + self.batch_size], starts

    @property
    def epoch_done(self) -> bool:
        """The epoch's last batch was taken; ``end_epoch`` starts the next one."""
        return self.pos == self.per_epoch

    def end_epoch(self) -> None:
        self.pos, self._epoch_state = 0, self._gen.get_state()

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint keys of older versions: batches taken, generator before the
        epoch's permutation (drawn again on load)."""
        return {"pos": self.pos, "data_rng": self._epoch_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch_state, self.pos = state["data_rng"], state["pos"]
        self._gen.set_state(self._epoch_state)
        if self.pos > 0:  # mid-epoch
            self._perm = torch.randperm(self.n, generator=self._gen)
