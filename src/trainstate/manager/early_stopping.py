"""EarlyStopping: stop when the monitored metric has not improved for ``patience`` evaluations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainstate.manager.policies import Mode, is_better

__all__ = ["EarlyStopping"]


@dataclass
class EarlyStopping:
    """Patience counter over the manager's monitored metric; its state is saved with each checkpoint.

    Args:
        patience: Evaluations without improvement after which training should stop.
        min_delta: The smallest change that counts as an improvement.

    Example:
        >>> stopper = EarlyStopping(patience=2)
        >>> [stopper.update(v, "min") for v in [1.0, 0.9, 0.95, 0.91]]
        [False, False, False, True]
    """

    patience: int
    min_delta: float = 0.0
    best: float | None = None
    bad_evaluations: int = 0

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"EarlyStopping(patience={self.patience}): patience must be >= 1")
        if self.min_delta < 0:
            raise ValueError(f"EarlyStopping(min_delta={self.min_delta}): min_delta must be >= 0")

    def update(self, value: float, mode: Mode) -> bool:
        """Record one evaluation; returns True once patience is exhausted."""
        if is_better(value, self.best, mode, self.min_delta):
            self.best, self.bad_evaluations = value, 0
        else:
            self.bad_evaluations += 1
        return self.should_stop

    @property
    def should_stop(self) -> bool:
        return self.bad_evaluations >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evaluations": self.bad_evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evaluations = state["best"], int(state["bad_evaluations"])
