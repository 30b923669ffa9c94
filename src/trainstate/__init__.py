"""trainstate: save and resume the complete state of a PyTorch training run, exactly and safely."""

from __future__ import annotations

from trainstate._version import __version__
from trainstate.api import Peek, load, peek, save
from trainstate.data import ResumableSampler
from trainstate.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    StateMismatchError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
    UnsupportedValueError,
)
from trainstate.manager import CheckpointManager, EarlyStopping
from trainstate.rng import RNGState

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointLockedError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "EarlyStopping",
    "Peek",
    "RNGState",
    "ResumableSampler",
    "StateMismatchError",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "UnsupportedValueError",
    "__version__",
    "load",
    "peek",
    "save",
]
