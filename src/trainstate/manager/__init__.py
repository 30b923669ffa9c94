"""Managed checkpointing: retention policies, triggers, preemption, early stopping, auto-resume."""

from __future__ import annotations

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
    "SaveHandle",
    "SaveTrigger",
    "checkpoint_info",
    "parse_step_name",
    "read_catalog",
    "step_name",
]
