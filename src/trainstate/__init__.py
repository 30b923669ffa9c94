"""trainstate: save and resume the complete state of a PyTorch training run, exactly and safely."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
}


_SUBMODULES = frozenset({"api", "convert", "data", "distributed", "format", "loaders", "manager", "rng", "storage"})


def __getattr__(name: str) -> Any:
    import importlib

    if name in _SUBMODULES:  # ``trainstate.api.x`` without importing trainstate.api first
        return importlib.import_module(f"trainstate.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trainstate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
