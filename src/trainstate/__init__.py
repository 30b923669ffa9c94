"""trainstate: save and resume the complete state of a PyTorch training run, exactly and safely."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainstate._lazy import lazy_attributes
from trainstate._version import __version__
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

if TYPE_CHECKING:
    from trainstate.api import Peek, load, peek, save
    from trainstate.data import ResumableSampler
    from trainstate.manager import CheckpointManager, EarlyStopping
    from trainstate.rng import RNGState
    from trainstate.run import Run

# `import trainstate` stays cheap (no torch) until one of these is touched: the CLI's --version and
# tools that only catch trainstate's errors never pay for torch.
_LAZY = {
    "Peek": "trainstate.api",
    "load": "trainstate.api",
    "peek": "trainstate.api",
    "save": "trainstate.api",
    "ResumableSampler": "trainstate.data",
    "CheckpointManager": "trainstate.manager",
    "EarlyStopping": "trainstate.manager",
    "RNGState": "trainstate.rng",
    "Run": "trainstate.run",
}


_SUBMODULES = frozenset(
    {"api", "convert", "data", "distributed", "format", "integrations", "loaders", "manager", "rng", "run", "storage"}
)
_exported, __dir__ = lazy_attributes(globals(), _LAZY)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # ``trainstate.api.x`` without importing trainstate.api first
        import importlib

        return importlib.import_module(f"trainstate.{name}")
    return _exported(name)


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
    "Run",
    "StateMismatchError",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "UnsupportedValueError",
    "__version__",
    "load",
    "peek",
    "save",
]
