"""ResumableSampler: a Stateful sampler so a plain DataLoader resumes mid-epoch on the exact next sample."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

from trainstate.errors import StateMismatchError

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Yields a (shuffled) epoch of indices and remembers how far it got, and in which epoch.

    The permutation of epoch ``e`` is a pure function of ``(seed, e)``, so a restored sampler
    regenerates it and skips what was already consumed. When an epoch is exhausted the sampler
    moves to the next one by itself (calling `set_epoch` is optional).

    Exact with ``DataLoader(num_workers=0)``: the loader then pulls indices only as batches are
    handed to the loop. With worker processes the loader prefetches, so the count runs ahead of
    the loop; use ``torchdata.stateful_dataloader.StatefulDataLoader`` there (trainstate saves it as
    a live object) — see the README.

    Example:
        >>> sampler = ResumableSampler(range(10), shuffle=True, seed=0)
        >>> it = iter(sampler); consumed = [next(it) for _ in range(3)]
        >>> state = sampler.state_dict()
        >>> again = ResumableSampler(range(10), shuffle=True, seed=0); again.load_state_dict(state)
        >>> list(again) == list(it)
        True
    """

    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0) -> None:
        self.length = data_source if isinstance(data_source, int) else len(data_source)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.consumed = 0
        self._resume = False  # the position came from load_state_dict: the next iteration continues it

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (no-op if already positioned in it, e.g. after a restore)."""
        if epoch != self.epoch:
            self.epoch, self.consumed, self._resume = epoch, 0, False

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.length, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        if self.consumed and not self._resume:
            # A new iteration while the previous one was abandoned part-way (``drop_last``, ``break``):
            # that is a new epoch, exactly as for an uninterrupted run.
            self.epoch, self.consumed = self.epoch + 1, 0
        self._resume = False
        order = self._order()
        while self.consumed < self.length:
            index = order[self.consumed]
            self.consumed += 1
            yield index
        self.epoch, self.consumed = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "length": self.length,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; raises StateMismatchError if the dataset size or order settings differ."""
        for key in ("length", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise StateMismatchError(
                    f"sampler.{key}: {state[key]!r} in the checkpoint, {getattr(self, key)!r} here; "
                    "the resumed run would see different data"
                )
        if not 0 <= state["consumed"] <= self.length:
            raise StateMismatchError(f"sampler.consumed: {state['consumed']} is outside the dataset of {self.length}")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._resume = True
