"""ResumableSampler: a Stateful sampler so a plain DataLoader resumes mid-epoch on the exact next sample."""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Iterator, Sized
from types import FrameType
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

    Exact with any ``DataLoader``, with or without worker processes: a loader with workers pulls
    indices ahead of the loop (prefetching), so the sampler finds the loader iterator that drives
    it and counts the samples of the batches that iterator has handed to the loop, not the indices
    it has pulled. Give the DataLoader a generator of its own (``generator=torch.Generator()``):
    without one it draws from the global RNG when an epoch starts, which a resumed run does after
    the restore; the sampler warns when that happened. With ``persistent_workers=True`` call
    `set_epoch` at the start of every epoch (the loader iterator then outlives the epoch).

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
        self._driver: _Driver | None = None  # the loader iterator of the current iteration, if any
        self._rng_at_restore: torch.Tensor | None = None

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
        if (
            self._resume
            and self._rng_at_restore is not None
            and not torch.equal(torch.get_rng_state(), self._rng_at_restore)
        ):
            warnings.warn(
                "ResumableSampler: the global torch RNG was drawn from between the restore and the first batch of "
                "the resumed epoch (a DataLoader without generator= does that when an epoch starts); random draws "
                "(dropout...) now differ from an uninterrupted run: pass generator=torch.Generator() to the DataLoader",
                stacklevel=2,
            )
        self._resume, self._rng_at_restore = False, None
        self._driver = _Driver.find(self, sys._getframe(1))
        order = self._order()
        while self.consumed < self.length:
            index = order[self.consumed]
            self.consumed += 1
            yield index
        self.epoch, self.consumed = self.epoch + 1, 0

    def _position(self) -> tuple[int, int]:
        """(epoch, samples consumed) as the training loop sees it."""
        driver = self._driver
        if driver is None or not driver.alive():
            return self.epoch, self.consumed
        # After the epoch's last batch this is (epoch, all consumed): the resumed iteration of that epoch
        # yields nothing, as the interrupted one would have, and the next iteration starts the next epoch.
        return driver.epoch, min(driver.start + driver.delivered() * driver.batch_size, self.length)

    def state_dict(self) -> dict[str, Any]:
        epoch, consumed = self._position()
        return {
            "epoch": epoch,
            "consumed": consumed,
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
        self._resume, self._driver = True, None

    def _trainstate_restored(self) -> None:
        """Called once every object of a load is restored: remember the global RNG as it is now."""
        self._rng_at_restore = torch.get_rng_state()


class _Driver:
    """The DataLoader iterator pulling from a sampler, seen through the counter of batches it has
    handed to the loop (``_num_yielded``, a torch internal stable across 2.x; without it, or when
    the sampler is iterated by hand, the sampler counts the indices pulled)."""

    def __init__(self, iterator: Any, epoch: int, start: int) -> None:
        self._iterator = weakref.ref(iterator)
        index_sampler = iterator._index_sampler
        self.epoch, self.start = epoch, start
        self.batch_size = int(index_sampler.batch_size) if iterator._auto_collation else 1

    @classmethod
    def find(cls, sampler: ResumableSampler, frame: FrameType | None) -> _Driver | None:
        """The loader iterator among the callers of ``sampler``'s iteration (sampler <- batch sampler
        <- the iterator's ``_next_index``), or None."""
        from torch.utils.data.dataloader import _BaseDataLoaderIter

        for _ in range(8):
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, _BaseDataLoaderIter):
                if type(candidate).__module__.startswith("torchdata"):
                    return None  # a StatefulDataLoader accounts for prefetching itself, from the raw count
                try:
                    return cls(candidate, sampler.epoch, sampler.consumed)
                except (AttributeError, TypeError):
                    return None
            frame = frame.f_back
        return None

    def alive(self) -> bool:
        return self._iterator() is not None

    def delivered(self) -> int:
        iterator = self._iterator()
        return int(getattr(iterator, "_num_yielded", 0)) if iterator is not None else 0
