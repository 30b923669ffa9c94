"""Pure retention and trigger policies over checkpoint infos: no I/O, table-testable."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "CheckpointInfo",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "Retention",
    "RetentionPolicy",
    "SaveTrigger",
    "is_better",
]

Mode = Literal["min", "max"]


@dataclass(frozen=True)
class CheckpointInfo:
    """What retention needs to know about one committed checkpoint."""

    step: int
    metrics: Mapping[str, float] = field(default_factory=dict)


def metric_value(info: CheckpointInfo, monitor: str) -> float | None:
    """The monitored value if present and a finite number (a NaN loss is never "best")."""
    value = info.metrics.get(monitor)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def is_better(candidate: float, reference: float | None, mode: Mode, min_delta: float = 0.0) -> bool:
    """Whether ``candidate`` improves on ``reference`` by more than ``min_delta``."""
    if reference is None:
        return True
    return candidate < reference - min_delta if mode == "min" else candidate > reference + min_delta


@runtime_checkable
class RetentionPolicy(Protocol):
    """Says which committed checkpoints it keeps; the manager keeps the union of its policies (and
    always the newest). Pure: no I/O, a function of the infos alone (like orbax's preservation
    policies). Write your own to keep, say, the checkpoint of every epoch's end."""

    def keep(self, infos: Sequence[CheckpointInfo]) -> set[int]: ...


@dataclass(frozen=True)
class KeepLast:
    """Keep the ``n`` newest checkpoints."""

    n: int

    def keep(self, infos: Sequence[CheckpointInfo]) -> set[int]:
        return {i.step for i in sorted(infos, key=lambda i: i.step)[-self.n :]} if self.n > 0 else set()


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``k`` best checkpoints by ``monitor``; ties go to the older one (it was best first)."""

    k: int
    monitor: str
    mode: Mode = "min"

    def keep(self, infos: Sequence[CheckpointInfo]) -> set[int]:
        scored = [(v, i.step) for i in infos if (v := metric_value(i, self.monitor)) is not None]
        sign = 1.0 if self.mode == "min" else -1.0
        return {step for _, step in sorted(scored, key=lambda vs: (sign * vs[0], vs[1]))[: self.k]}


@dataclass(frozen=True)
class KeepEvery:
    """Keep every checkpoint whose step is a multiple of ``n`` (permanent milestones)."""

    n: int

    def keep(self, infos: Sequence[CheckpointInfo]) -> set[int]:
        return {i.step for i in infos if i.step % self.n == 0}


@dataclass(frozen=True)
class Retention:
    """Union of policies; the newest checkpoint is always kept. No policies means keep everything."""

    policies: tuple[RetentionPolicy, ...] = ()

    def to_delete(self, infos: Sequence[CheckpointInfo]) -> list[int]:
        """Steps no policy keeps, ascending."""
        if not self.policies or not infos:
            return []
        keep = {max(i.step for i in infos)}
        for policy in self.policies:
            keep |= policy.keep(infos)
        return sorted(i.step for i in infos if i.step not in keep)


@dataclass(frozen=True)
class SaveTrigger:
    """When ``save(step, state)`` actually saves: every n steps and/or every n seconds; with neither
    configured, at every call."""

    every_n_steps: int | None = None
    every_n_seconds: float | None = None

    def should_save(self, step: int, now: float, last_save_time: float | None) -> bool:
        if self.every_n_steps is None and self.every_n_seconds is None:
            return True
        if self.every_n_steps is not None and step % self.every_n_steps == 0:
            return True
        if self.every_n_seconds is not None:
            return last_save_time is None or now - last_save_time >= self.every_n_seconds
        return False
