"""`Run`: a plain training loop made exactly resumable and preemption-safe by three added lines."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

from trainstate.data import ResumableSampler
from trainstate.loaders import is_stateful_loader
from trainstate.manager import CheckpointManager
from trainstate.rng import RNGState

__all__ = ["Run"]

logger = logging.getLogger(__name__)

DEFAULT_EVERY_N_SECONDS = 600.0
"""How often a `Run` saves when given no trigger: a kill -9 loses at most ten minutes of work."""

_DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SLURM, Kubernetes eviction, `scancel --signal=USR1`


class Run:
    """A training loop's checkpoints: restore on start, save while it runs, stop cleanly when preempted.

    It is a `CheckpointManager` plus what a loop otherwise wires up by hand: the global RNG streams
    (`RNGState`) and the data position (the loader, or its `ResumableSampler`) join the state, the
    newest checkpoint that verifies is restored when the `Run` is created, and `batches` yields the
    loader's batches epoch after epoch from exactly where the killed run stopped, counting steps and
    saving after each step whose trigger fires, on a preemption signal (then the loop ends) and at
    ``max_steps``. Per-step losses of a killed and resumed run equal an uninterrupted run's, bit for bit.

    Create it right before the loop: anything that draws random numbers between the restore and the
    first batch (building a model, an evaluation) shifts the streams the restore put back. Plain
    values of ``state`` (a best score, a counter) are restored into `state`, a dict of the Run's own.

    Args:
        directory: Where the checkpoints live (a path or URL, as for `CheckpointManager`).
        state: The live objects (model, optimizer, scheduler, ``GradScaler``...) and plain values to
            checkpoint. ``"rng"`` (an `RNGState`) and the loader's position are added unless present.
        loader: What the loop iterates: a ``DataLoader`` whose sampler is a `ResumableSampler` (or has
            ``state_dict``/``load_state_dict``), a torchdata ``StatefulDataLoader``, or any iterable
            with ``state_dict``/``load_state_dict``.
        every_n_steps: Save after every ``n``-th step.
        every_n_seconds: Save when this long has passed since the last save; with neither trigger,
            every `DEFAULT_EVERY_N_SECONDS`.
        preemption_signals: After one of these, the next step saves and `batches` ends (`stopped`).
        **options: Any other `CheckpointManager` option (``keep_last``, ``keep_best``/``monitor``,
            ``async_save``, ``remote``, ``storage_options``, ...).

    Example:
        >>> import torch, trainstate
        >>> from torch.utils.data import DataLoader
        >>> data = torch.utils.data.TensorDataset(torch.randn(8, 2), torch.randn(8, 1))
        >>> loader = DataLoader(data, batch_size=2, sampler=trainstate.ResumableSampler(data, seed=0),
        ...                     generator=torch.Generator())
        >>> model = torch.nn.Linear(2, 1); optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with trainstate.Run("/tmp/ts-doc/run-loop", {"model": model, "optimizer": optimizer},
        ...                     loader=loader, every_n_steps=3) as run:
        ...     for x, y in run.batches(max_steps=6):
        ...         optimizer.zero_grad(); torch.nn.functional.mse_loss(model(x), y).backward(); optimizer.step()
        ...     run.step, run.manager.steps()[-1]
        (6, 6)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        state: Mapping[str, Any],
        *,
        loader: Iterable[Any],
        every_n_steps: int | None = None,
        every_n_seconds: float | None = None,
        preemption_signals: Iterable[signal.Signals | int] = _DEFAULT_SIGNALS,
        **options: Any,
    ) -> None:
        self.loader = loader
        self.state: dict[str, Any] = dict(state)
        if not any(isinstance(value, RNGState) for value in self.state.values()):
            self.state[_free_key(self.state, "rng")] = RNGState()
        position = _position(loader)
        if not any(value is position for value in self.state.values()):
            self.state[_free_key(self.state, "loader")] = position
        if every_n_steps is None and every_n_seconds is None:
            every_n_seconds = DEFAULT_EVERY_N_SECONDS
        self.manager = CheckpointManager(
            directory,
            every_n_steps=every_n_steps,
            every_n_seconds=every_n_seconds,
            preemption_signals=preemption_signals,
            **options,
        )
        self._metrics: dict[str, Any] | None = None
        try:
            self.resumed_from: int | None = self.manager.restore(self.state)
        except BaseException:
            self.manager.close()
            raise
        self.step = self.resumed_from or 0
        if self.resumed_from is not None:
            logger.info("%s: resumed from step %d", self.manager.directory, self.resumed_from)

    def batches(self, *, max_steps: int | None = None) -> Iterator[Any]:
        """The loader's batches, epoch after epoch, from the restored position on.

        `step` counts the batch being yielded (1 for the first of a fresh run, as ``step += 1`` at
        the top of a loop body). After the loop body (when the next batch is asked for) the manager
        saves if a trigger fired, a preemption signal arrived, or ``max_steps`` is reached; the
        iteration then ends on preemption, early stopping or ``max_steps`` (without any of them,
        never). Metrics given to `report` during the step go with that checkpoint.
        """
        if max_steps is not None and (type(max_steps) is not int or max_steps < 0):
            raise ValueError(f"max_steps must be a non-negative int or None, got {max_steps!r}")
        empty_epochs = 0
        while max_steps is None or self.step < max_steps:
            yielded = False
            for batch in self.loader:
                yielded = True
                self.step += 1
                yield batch
                done = max_steps is not None and self.step >= max_steps
                metrics, self._metrics = self._metrics, None
                self.manager.save(self.step, self.state, metrics, force=done)
                if done or self.manager.should_stop:
                    return
            # A resume at the very end of an epoch finds that epoch exhausted; two empty ones in a row
            # mean the loader has no data at all.
            empty_epochs = 0 if yielded else empty_epochs + 1
            if empty_epochs == 2:
                raise ValueError(f"{self.manager.directory}: the loader yielded no batches")

    def report(self, **metrics: Any) -> None:
        """Metrics of the current step (e.g. ``loss=loss``), saved with its checkpoint if one is taken
        (they drive ``keep_best``/``monitor`` and early stopping)."""
        self._metrics = {**(self._metrics or {}), **metrics}

    @property
    def stopped(self) -> bool:
        """Whether the loop ended before ``max_steps``: preempted (after saving) or early-stopped."""
        return self.manager.should_stop

    @property
    def stop_reason(self) -> str | None:
        return self.manager.stop_reason

    def close(self) -> None:
        """Wait for a background save and release the directory (raises a failed save's error)."""
        self.manager.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def _position(loader: Iterable[Any]) -> Any:
    """The object whose state is the loader's position in its data."""
    if is_stateful_loader(loader):
        return loader
    for candidate in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None), loader):
        if isinstance(candidate, ResumableSampler) or (
            callable(getattr(candidate, "state_dict", None)) and callable(getattr(candidate, "load_state_dict", None))
        ):
            return candidate
    raise TypeError(
        f"loader: a {type(loader).__name__} of a {type(getattr(loader, 'sampler', None)).__name__} cannot resume "
        "mid-epoch; use DataLoader(dataset, sampler=trainstate.ResumableSampler(dataset), "
        "generator=torch.Generator()) or torchdata's StatefulDataLoader"
    )


def _free_key(state: Mapping[str, Any], key: str) -> str:
    if key in state:
        raise ValueError(f"state[{key!r}] is taken: name the {key} entry yourself or rename yours")
    return key
