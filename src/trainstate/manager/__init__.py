"""Managed checkpointing: retention policies, triggers, preemption, early stopping, auto-resume.

Attributes are imported on first use: the policies and the catalog need no torch (``trainstate ls``
and ``prune`` use them), the manager itself does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainstate._lazy import lazy_attributes

if TYPE_CHECKING:
    from trainstate.manager.catalog import CatalogEntry, checkpoint_info, parse_step_name, read_catalog, step_name
    from trainstate.manager.checkpoint_manager import CheckpointManager, SaveHandle
    from trainstate.manager.early_stopping import EarlyStopping
    from trainstate.manager.policies import (
        CheckpointInfo,
        KeepBest,
        KeepEvery,
        KeepLast,
        Retention,
        RetentionPolicy,
        SaveTrigger,
    )
    from trainstate.manager.preemption import PreemptionHandler

_POLICIES = ("CheckpointInfo", "KeepBest", "KeepEvery", "KeepLast", "Retention", "RetentionPolicy", "SaveTrigger")
_CATALOG = ("CatalogEntry", "checkpoint_info", "parse_step_name", "read_catalog", "step_name")
_WHERE = {
    **dict.fromkeys(_CATALOG, "trainstate.manager.catalog"),
    **dict.fromkeys(("CheckpointManager", "SaveHandle"), "trainstate.manager.checkpoint_manager"),
    "EarlyStopping": "trainstate.manager.early_stopping",
    **dict.fromkeys(_POLICIES, "trainstate.manager.policies"),
    "PreemptionHandler": "trainstate.manager.preemption",
}
__getattr__, __dir__ = lazy_attributes(globals(), _WHERE)

__all__ = [
    "CatalogEntry",
    "CheckpointInfo",
    "CheckpointManager",
    "EarlyStopping",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "PreemptionHandler",
    "Retention",
    "RetentionPolicy",
    "SaveTrigger",
    "SaveHandle",
    "checkpoint_info",
    "parse_step_name",
    "read_catalog",
    "step_name",
]
