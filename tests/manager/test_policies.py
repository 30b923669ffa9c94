"""Retention and trigger policies are pure functions of checkpoint infos: table-driven tests."""

from __future__ import annotations

import math

import pytest

from trainstate.manager.policies import CheckpointInfo, KeepBest, KeepEvery, KeepLast, Retention, SaveTrigger


def infos(*metrics: float | None) -> list[CheckpointInfo]:
    return [CheckpointInfo(step, {} if m is None else {"loss": m}) for step, m in enumerate(metrics, start=1)]


@pytest.mark.parametrize(
    ("policies", "history", "deleted"),
    [
        ((), infos(1, 2, 3), []),
        ((KeepLast(2),), infos(1, 2, 3, 4), [1, 2]),
        ((KeepLast(1), KeepBest(1, "loss")), infos(0.5, 0.1, 0.4, 0.3), [1, 3]),
        ((KeepLast(0), KeepBest(2, "loss")), infos(0.5, 0.1, 0.4, 0.3), [1, 3]),  # newest (4) always kept
        ((KeepLast(1), KeepBest(1, "loss", "max")), infos(0.5, 0.1, 0.9, 0.3), [1, 2]),
        ((KeepLast(1), KeepBest(1, "loss")), infos(0.2, 0.2, 0.3), [2]),  # tie: the older was best first
        ((KeepLast(1), KeepBest(1, "loss")), infos(None, 0.3, None), [1]),  # no metric: never best
        ((KeepLast(1), KeepBest(1, "loss")), infos(math.nan, 0.3, 0.4), [1]),  # nan: never best
        ((KeepLast(1), KeepEvery(2)), infos(1, 2, 3, 4, 5), [1, 3]),
        ((KeepLast(2), KeepBest(1, "loss"), KeepEvery(3)), infos(0.1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5), [2, 4, 5]),
    ],
    ids=lambda v: repr(v)[:40] if not isinstance(v, list) else None,
)
def test_retention_table(policies, history, deleted):
    assert Retention(policies).to_delete(history) == deleted


def test_tutorial_scenario_best_is_never_evicted():
    """The tutorial's manager sorts by loss and pops index 0 — the best — once it holds 5. Ours keeps it."""
    history = infos(0.5, 0.1, 0.4, 0.3, 0.35, 0.45)
    retention = Retention((KeepLast(4), KeepBest(1, "loss")))
    assert 2 not in retention.to_delete(history)
    assert retention.to_delete(history) == [1]


@pytest.mark.parametrize(
    ("trigger", "step", "now", "last", "expected"),
    [
        (SaveTrigger(), 10, 100.0, 0.0, True),  # no trigger: every call saves
        (SaveTrigger(every_n_steps=5), 10, 0.0, 0.0, True),
        (SaveTrigger(every_n_steps=5), 11, 0.0, 0.0, False),
        (SaveTrigger(every_n_seconds=60), 11, 59.0, 0.0, False),
        (SaveTrigger(every_n_seconds=60), 11, 60.0, 0.0, True),
        (SaveTrigger(every_n_steps=5, every_n_seconds=60), 11, 61.0, 0.0, True),
    ],
)
def test_trigger_table(trigger, step, now, last, expected):
    assert trigger.should_save(step, now, last) is expected
